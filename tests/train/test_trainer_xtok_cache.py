"""The cross-tokenizer teacher cache (teacher/cache/cross.py): built once for a student of another tokenizer family,
verified like every cache, read by the cross-tokenizer loss; the same loss as the online teacher up to the top-k.

The student reads a byte-level BPE (`Ġ`), the teacher a SentencePiece-style BPE with byte fallback; tiny random
Llamas built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_helpers import read_log
from potstill.config import load_config
from potstill.data.packing import load_dataset
from potstill.errors import UserError
from potstill.losses import Divergence
from potstill.losses.align import cross_tokenizer_terms
from potstill.teacher.cache import TeacherCache, build_cache, verify_report
from potstill.teacher.cache.cross import CrossCache
from potstill.teacher.cross import CrossTokenizerTeacher
from potstill.train.recipes import run_distill
from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe

SEQ_LEN = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory, build_model) -> Path:
    root = tmp_path_factory.mktemp("xtok_cache")
    build_model(byte_level_bpe(), 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=64, save_to=root / "teacher")
    build_model(byte_level_bpe(400), 2, hidden=32, max_positions=64, save_to=root / "other_student")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=8, save_to=root / "short_teacher")
    rows = [{"text": t} for t in TEXTS * 4]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _build(pair: Path, out: Path, **kw) -> Path:
    opts = {"seq_len": SEQ_LEN, "batch_size": 3, "shard_tokens": 4 * SEQ_LEN, "progress": False, **kw}
    return build_cache(pair / "teacher", [pair / "train.jsonl"], out, student=pair / "student", **opts)


def _terms(pair: Path, cache_dir: Path, seq_weight: float, temperature: float = 1.0):
    """(online terms, cached terms) of one batch of 4 packed sequences with the same random student head."""
    student_tok = AutoTokenizer.from_pretrained(pair / "student")
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher")
    data = load_dataset([pair / "train.jsonl"], student_tok, SEQ_LEN)
    batch = {k: getattr(data, k)[2:6] for k in ("input_ids", "attention_mask", "labels")}
    batch["index"] = torch.arange(2, 6)
    online = CrossTokenizerTeacher(teacher, student_tok, AutoTokenizer.from_pretrained(pair / "teacher"))
    cached = CrossCache(TeacherCache(cache_dir), student_tok)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch["input_ids"].numel(), 16, generator=g)
    weight = torch.randn(len(student_tok), 16, generator=g)
    div = Divergence("fkl", temperature=temperature)
    out = []
    for source in (online, cached):
        terms = cross_tokenizer_terms(hidden, weight, source.targets_for(batch), div, seq_weight=seq_weight)
        out.append(terms)
    return out


def test_cache_with_the_whole_shared_vocabulary_gives_the_online_loss(pair, tmp_path):
    """k >= the shared vocabulary, lossless: both terms equal the online teacher's (float32 rounding)."""
    cache = _build(pair, tmp_path / "cache", k=10_000, encoding="lossless", temperature=2.0)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["k"] == manifest["cross_tokenizer"]["shared_tokens"]
    online, cached = _terms(pair, cache, seq_weight=1.0, temperature=2.0)
    assert online.n_tokens == cached.n_tokens and online.stats == cached.stats
    assert cached.kd.item() == pytest.approx(online.kd.item(), rel=1e-5)
    assert cached.ce.item() == pytest.approx(online.ce.item(), rel=1e-6)
    report = verify_report(cache)
    assert "ok:" in report and "cross-tokenizer: the teacher's own tokenizer" in report  # says what kind of cache


def test_top_k_cache_keeps_term_a_exact_and_bounds_term_b(pair, tmp_path):
    """k = 4: term (a) (group likelihoods) is exact; term (b) is the bucket view over the k ids, a lower bound of
    the online value for fkl (coarser categories), and close to it; the compact encoding stays close to lossless."""
    lossless = _build(pair, tmp_path / "k4", k=4, encoding="lossless")
    compact = _build(pair, tmp_path / "k4c", k=4, encoding="compact")
    a_online, a_cached = _terms(pair, lossless, seq_weight=1.0)
    b_online, b_cached = _terms(pair, lossless, seq_weight=0.0)
    term_a = (a_online.kd - b_online.kd, a_cached.kd - b_cached.kd)
    assert term_a[1].item() == pytest.approx(term_a[0].item(), rel=1e-5)
    assert 0 < b_cached.kd.item() <= b_online.kd.item() + 1e-6
    assert b_cached.kd.item() < 0.999 * b_online.kd.item()  # the truncation is visible at k = 4
    _, c_compact = _terms(pair, compact, seq_weight=0.0)
    assert c_compact.kd.item() == pytest.approx(b_cached.kd.item(), rel=0.02)


def test_build_is_resumable_and_verified_like_a_same_tokenizer_cache(pair, tmp_path):
    cache = _build(pair, tmp_path / "cache", k=8)
    first = {p.name: p.read_bytes() for p in cache.glob("shard-*.bin")}
    assert len(first) > 1
    (cache / "manifest.json").unlink()
    (cache / "shard-00001.bin").unlink()
    _build(pair, tmp_path / "cache", k=8)  # resumes: rewrites the missing shard, byte for byte
    assert {p.name: p.read_bytes() for p in cache.glob("shard-*.bin")} == first
    shard = cache / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        TeacherCache(cache).verify()


def test_wrong_student_unsupported_targets_and_short_context_are_one_line(pair, tmp_path):
    with pytest.raises(UserError, match="--targets topk"):
        _build(pair, tmp_path / "sampled", targets="sampled")
    assert not (tmp_path / "sampled").exists()
    opts = {"seq_len": SEQ_LEN, "progress": False, "student": pair / "student"}
    with pytest.raises(UserError, match=r"--data: packed sequence \d+ is .* longer than its context length 8"):
        build_cache(pair / "short_teacher", [pair / "train.jsonl"], tmp_path / "short", **opts)
    assert not (tmp_path / "short").exists()  # checked before anything is written
    cache = TeacherCache(_build(pair, tmp_path / "cache", k=8))
    with pytest.raises(UserError, match="built for a student with another tokenizer"):
        cache.check(tokenizer=AutoTokenizer.from_pretrained(pair / "other_student"))


def _opts(pair: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.student={pair / 'student'}", f"model.teacher={pair / 'teacher'}",
        f"data.train=[{pair / 'train.jsonl'}]", f"data.seq_len={SEQ_LEN}", f"train.output_dir={out}",
        "train.batch_size=4", "train.lr=0.01", "train.warmup_steps=0", "train.logging_steps=1", "train.max_steps=3",
        "loss.alpha=0.5", *extra,
    ]  # fmt: skip


def test_distill_from_the_cache_equals_the_online_run(pair, tmp_path):
    """The same 3 steps from the cache (whole shared vocabulary, lossless) and from the online teacher."""
    cache = _build(pair, tmp_path / "cache", k=10_000, encoding="lossless")
    online = read_log(run_distill(load_config(None, _opts(pair, tmp_path / "online"))))
    cached_opts = _opts(pair, tmp_path / "cached", "teacher.source=cache", f"teacher.cache={cache}")
    cached = read_log(run_distill(load_config(None, cached_opts)))
    assert len(online) == len(cached) == 3
    for a, b in zip(online, cached, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4) and b["ce"] == pytest.approx(a["ce"], rel=1e-4)
        assert b["xtok_one_to_one"] == a["xtok_one_to_one"]


def test_cache_read_by_the_wrong_student_or_never_is_one_line(pair, tmp_path, distill_error):
    cache = _build(pair, tmp_path / "cache", k=8)
    line = distill_error(*_opts(pair, tmp_path / "run", "teacher.source=cache", f"teacher.cache={cache}",
                                f"model.student={pair / 'other_student'}"))  # fmt: skip
    assert "built for a student with another tokenizer" in line and "--student" in line
    line = distill_error(*_opts(pair, tmp_path / "run", "teacher.source=cache", f"teacher.cache={cache}",
                                "loss.cross_tokenizer=never"))  # fmt: skip
    assert "cross-tokenizer cache" in line
    assert not (tmp_path / "run").exists()
