"""`potstill distill` with a teacher of another tokenizer family (cross-tokenizer KD, docs/cross_tokenizer.md).

The student reads a byte-level BPE (`Ġ`), the teacher a SentencePiece-style BPE with byte fallback (`▁`, `<0xNN>`)
and other special strings and ids; both tiny random Llamas built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill_helpers import read_log
from potstill.config import load_config
from potstill.train.recipes import run_distill
from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, build_model) -> Path:
    root = tmp_path_factory.mktemp("xtok")
    build_model(byte_level_bpe(), 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=64, save_to=root / "teacher")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=8, save_to=root / "short_teacher")
    rows = [{"text": t} for t in TEXTS * 4]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _opts(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
        f"data.train=[{root / 'train.jsonl'}]",
        "data.seq_len=24", f"train.output_dir={out}", "train.batch_size=4", "train.lr=0.01", "train.warmup_steps=0",
        "train.logging_steps=5", "train.max_steps=20", "loss.alpha=0.5", *extra,
    ]  # fmt: skip


def test_smoke_run_with_another_tokenizer_loss_falls(pair_dir, tmp_path):
    """KD only (alpha 1: the random teacher is all the student learns from): the cross-tokenizer KD term falls."""
    opts = _opts(pair_dir, tmp_path / "run", f"data.eval=[{pair_dir / 'train.jsonl'}]", "loss.alpha=1.0")
    out = run_distill(load_config(None, opts))
    log = read_log(out)
    assert [e["step"] for e in log] == [5, 10, 15, 20]
    assert log[-1]["kd"] < 0.7 * log[0]["kd"]
    for entry in log:  # both terms, and the align figures of the data
        assert entry["kd"] > 0 and entry["ce"] > 0 and entry["loss"] == pytest.approx(entry["kd"], rel=1e-5)
        assert 0 < entry["xtok_one_to_one"] <= entry["xtok_coverage"] <= 1
    report = json.loads((out / "eval.json").read_text())
    overall = report["overall"]  # KL / agreement on the positions aligned one to one
    assert 0 < overall["aligned_share"] <= 1 and overall["kl_to_teacher"] > 0 and 0 <= overall["top1_agreement"] <= 1


def test_cross_tokenizer_never_refuses_the_pair(pair_dir, tmp_path, distill_error):
    line = distill_error(*_opts(pair_dir, tmp_path / "run", "loss.cross_tokenizer=never", "train.max_steps=1"))
    assert "tokenizers differ" in line
    assert not (tmp_path / "run").exists()


def test_teacher_with_a_shorter_context_is_one_line(pair_dir, tmp_path, distill_error):
    line = distill_error(*_opts(pair_dir, tmp_path / "run", f"model.teacher={pair_dir / 'short_teacher'}"))
    assert "data.train: packed sequence " in line and "longer than its context length 8" in line
    assert "data.seq_len (now 24" in line
    assert not (tmp_path / "run").exists()  # checked before the run directory is made


def test_features_that_need_the_student_ids_are_refused(pair_dir, tmp_path, distill_error):
    line = distill_error(*_opts(pair_dir, tmp_path / "run", "hidden.weight=1.0", "train.max_steps=1"))
    assert "hidden.weight" in line and "another tokenizer" in line
