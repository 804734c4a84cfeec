"""`potstill check TEACHER STUDENT`: the table and the verdict, for a same-tokenizer and a cross-tokenizer pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from potstill.eval.check import check_pair, format_check
from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, build_model) -> Path:
    root = tmp_path_factory.mktemp("check")
    build_model(byte_level_bpe(), 0, hidden=32, save_to=root / "student")
    build_model(byte_level_bpe(), 1, hidden=48, vocab_size=328, save_to=root / "padded_teacher")  # 8 padding rows
    build_model(metaspace_bpe(), 1, hidden=48, save_to=root / "other_teacher")
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    return root


def test_same_tokenizer_pair(pair_dir):
    result = check_pair(pair_dir / "padded_teacher", pair_dir / "student")
    assert result.mode == "same" and result.verdict.startswith("same-tokenizer KD")
    rows = {r[0]: r for r in result.rows}
    assert (
        rows["head rows (beyond tokenizer)"][1] == "328 (+8)" and rows["head rows (beyond tokenizer)"][2] == "320 (+0)"
    )
    assert rows["ids writing the same bytes"][3] == "320 of 320 ids"


def test_cross_tokenizer_pair_with_data(pair_dir, run_main):
    result = check_pair(
        pair_dir / "other_teacher", pair_dir / "student", [pair_dir / "data.jsonl"], samples=4, seq_len=32
    )
    assert result.mode == "cross" and result.verdict.startswith("cross-tokenizer KD")
    rows = {r[0]: r for r in result.rows}
    assert rows["bos_token"][1:] == ("'<s>'", "'<bos>'", "differs")
    d = result.data
    assert 0 < d["one_to_one"] <= d["group_coverage"] <= 1
    assert 0 < d["teacher_mass_on_shared"] < 1 and 0 < d["student_tokens_shared"] <= 1
    assert d["student_bytes_per_token"] > 1 and d["teacher_bytes_per_token"] > 1
    proc = run_main("check", str(pair_dir / "other_teacher"), str(pair_dir / "student"), "--data",
                    str(pair_dir / "data.jsonl"), "--samples", "2", "--seq-len", "32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "verdict: cross-tokenizer KD" in proc.stdout and "one to one" in proc.stdout
    assert format_check(result).count("\n") > 15


def test_missing_model_is_one_line(pair_dir, run_main, assert_one_line_error):
    proc = run_main("check", str(pair_dir / "nope"), str(pair_dir / "student"))
    assert_one_line_error(proc, "nope", "does not exist")
