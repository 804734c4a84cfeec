"""The offline teacher cache: exact round trips, compact fidelity, resume, rank split, verification, bad input."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import potstill.fileio as fileio_mod
import potstill.teacher.cache.writer as cache_mod
from potstill.data.packing import load_dataset
from potstill.errors import UserError
from potstill.losses.sparse import topk_targets
from potstill.teacher.cache import (
    MANIFEST,
    Codec,
    TeacherCache,
    build_cache,
    dataset_fingerprint,
    finalize,
    shard_name,
    write_shards,
)
from potstill.teacher.online import OnlineTeacher

SEQ_LEN = 32
BATCH = 4


@pytest.fixture
def setup(tiny_model_dir, write_jsonl, tiny_corpus):
    """(teacher dir, data file): 30 packed sequences of 32 tokens over the 300-token tiny vocabulary."""
    data = write_jsonl("train.jsonl", [{"text": t} for t in tiny_corpus * 3])
    return tiny_model_dir, data


def build(setup, out, **kwargs) -> Path:
    teacher, data = setup
    opts = {"seq_len": SEQ_LEN, "batch_size": BATCH, "shard_tokens": 4 * SEQ_LEN, "progress": False, **kwargs}
    return build_cache(teacher, [data], out, **opts)


def teacher_logits(setup, tiny_tokenizer):
    """[N, L, V] float32 logits of the teacher over the packed data, batched like the build, and the dataset."""
    from transformers import AutoModelForCausalLM

    dataset = load_dataset([setup[1]], tiny_tokenizer, SEQ_LEN)
    teacher = OnlineTeacher(AutoModelForCausalLM.from_pretrained(setup[0]))
    logits = [
        teacher.logits(dataset.input_ids[i : i + BATCH], dataset.attention_mask[i : i + BATCH])
        for i in range(0, len(dataset), BATCH)
    ]
    return torch.cat(logits), dataset


def stored_mask(dataset) -> torch.Tensor:
    mask = torch.zeros_like(dataset.labels, dtype=torch.bool)
    mask[:, :-1] = dataset.labels[:, 1:] != -100
    return mask


def dense_from_sparse(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, k] -> [n, V] float64 probabilities: kept ids exact, tail spread uniformly over the other ids."""
    k = ids.shape[-1]
    probs = (tail.double() / max(vocab - k, 1)).unsqueeze(-1).expand(-1, vocab).clone()
    return probs.scatter(-1, ids, logprobs.double().exp())


def test_lossless_full_vocabulary_round_trip_is_exact(setup, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    cache = TeacherCache(build(setup, tmp_path / "c", k=vocab, encoding="lossless"))
    logits, dataset = teacher_logits(setup, tiny_tokenizer)
    mask = stored_mask(dataset)
    got = cache.targets(range(len(dataset)))
    assert got.ids.shape == (len(dataset), SEQ_LEN, vocab) and got.tail.shape == (len(dataset), SEQ_LEN)
    full = torch.log_softmax(logits, dim=-1)[mask]
    rebuilt = torch.full_like(full, float("nan")).scatter(-1, got.ids[mask], got.logprobs[mask])
    assert torch.equal(rebuilt, full)  # bit-exact float32, every id present once
    assert torch.equal(got.tail[mask], torch.zeros(int(mask.sum())))
    assert cache.manifest["tokens"] == int(mask.sum()) and len(cache) == len(dataset)
    assert cache.manifest["data"]["fingerprint"] == dataset_fingerprint(dataset)


def test_compact_keeps_top1_and_is_close_to_lossless(setup, tiny_tokenizer, tmp_path):
    k, vocab = 32, len(tiny_tokenizer)
    compact = TeacherCache(build(setup, tmp_path / "compact", k=k, temperature=2.0))
    logits, dataset = teacher_logits(setup, tiny_tokenizer)
    mask = stored_mask(dataset)
    got = compact.targets(range(len(dataset)))
    exact = topk_targets(logits[mask].double(), k, temperature=2.0)
    p = torch.softmax(logits[mask].double() / 2.0, dim=-1)
    assert torch.equal(got.ids[mask][:, 0], p.argmax(-1))  # the top-1 id is always exact
    assert torch.equal(got.ids[mask].sort(-1).values, exact.ids.sort(-1).values)  # same kept set
    # log-prob error within half a quantization step (step <= span / 255, span < 2 nats here)
    err = (
        got.logprobs[mask].double().gather(-1, got.ids[mask].argsort(-1))
        - exact.logprobs.gather(-1, exact.ids.argsort(-1))
    ).abs()
    assert err.max() < 0.01
    kl = lambda q: (p * (p.log() - q.log())).sum(-1).mean().item()  # noqa: E731
    kl_compact = kl(dense_from_sparse(got.ids[mask], got.logprobs[mask], got.tail[mask], vocab))
    kl_lossless = kl(dense_from_sparse(exact.ids, exact.logprobs, exact.tail, vocab))
    assert abs(kl_compact - kl_lossless) < 1e-4 and kl_compact < 1e-2
    assert compact.manifest["bytes_per_token"] < 0.4 * (8 * k + 4)  # far below the naive int32+float32 store


def test_codec_round_trips_with_three_byte_ids_and_sampled_counts():
    rng = np.random.default_rng(0)
    vocab, k, n = 70_000, 16, 5
    mask = np.zeros(SEQ_LEN, dtype=bool)
    mask[[1, 4, 5, 20, 30]] = True
    logits = torch.from_numpy(rng.normal(size=(n, vocab)) * 3)
    top = topk_targets(logits, k)
    codec = Codec("topk", "compact", k, vocab, SEQ_LEN)
    assert codec.id_planes == 3
    got_mask, ids, logprobs, tail = codec.decode(
        codec.encode(mask, top.ids.numpy(), top.logprobs.numpy(), top.tail.numpy())
    )
    assert np.array_equal(got_mask, mask) and np.array_equal(ids[:, 0], top.ids[:, 0].numpy())
    assert np.array_equal(np.sort(ids, 1), np.sort(top.ids.numpy(), 1))
    assert np.allclose(tail, top.tail.numpy(), atol=1e-3)
    draws = rng.integers(0, vocab, size=(n, 24))
    draws[:, :8] = 7  # a repeated id: count 8 (+ chance repeats)
    sampled = Codec("sampled", "compact", 24, vocab, SEQ_LEN)
    _, ids, logprobs, _ = sampled.decode(sampled.encode(mask, draws, None, None))
    for row, drawn in zip(range(n), draws, strict=True):
        values, counts = np.unique(drawn, return_counts=True)
        kept = logprobs[row] > -100
        assert dict(zip(ids[row][kept].tolist(), np.exp(logprobs[row][kept]) * 24, strict=True)) == pytest.approx(
            dict(zip(values.tolist(), counts.astype(float), strict=True))
        )
        assert len(set(ids[row].tolist())) == 24  # padding ids are distinct and unused
    assert np.allclose(np.exp(logprobs.astype(np.float64)).sum(1), 1.0)


def test_sampled_targets_are_an_empirical_distribution_of_teacher_draws(setup, tmp_path):
    cache = TeacherCache(build(setup, tmp_path / "s", targets="sampled", samples=16))
    got = cache.targets([0, 1])
    assert got.ids.shape[-1] == 16 and cache.manifest["targets"] == "sampled"
    probs = got.logprobs.double().exp().sum(-1)
    assert torch.allclose(probs, torch.ones_like(probs))  # stored and placeholder positions alike
    counts = got.logprobs.double().exp() * 16
    assert torch.allclose(counts, counts.round(), atol=1e-4) and torch.equal(got.tail, torch.zeros_like(got.tail))


def test_resume_after_interruption_writes_the_same_shards(setup, tmp_path, monkeypatch):
    reference = build(setup, tmp_path / "once")
    real, written = cache_mod._write_shard, []

    def crash_after_two(plan, scorer, j, batch_size, bar):
        if len(written) == 2:
            raise KeyboardInterrupt
        real(plan, scorer, j, batch_size, bar)
        written.append(j)

    monkeypatch.setattr(cache_mod, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(setup, tmp_path / "again")
    assert not (tmp_path / "again" / MANIFEST).exists()
    with pytest.raises(UserError, match="interrupted"):
        TeacherCache(tmp_path / "again")
    monkeypatch.setattr(cache_mod, "_write_shard", lambda *a: (written.append(a[2]), real(*a)))
    build(setup, tmp_path / "again")
    n_shards = len(TeacherCache(reference).manifest["shards"])
    assert sorted(written) == list(range(n_shards)) and len(written) == n_shards  # done shards not recomputed
    for j in range(n_shards):
        assert (tmp_path / "again" / shard_name(j)).read_bytes() == (reference / shard_name(j)).read_bytes()
    assert not list((tmp_path / "again").glob(".tmp-*"))


def test_ranks_write_their_own_shards_and_rank0_manifest_equals_one_run(setup, tmp_path):
    reference = TeacherCache(build(setup, tmp_path / "one", targets="sampled", samples=8))
    plan, scorer = cache_mod._prepare(
        setup[0],
        [setup[1]],
        tmp_path / "two",
        64,
        1.0,
        SEQ_LEN,
        True,
        "sampled",
        8,
        "compact",
        None,
        4 * SEQ_LEN,
        0,
        "float32",
        False,
    )
    for rank in (1, 0):
        write_shards(plan, scorer, BATCH, rank=rank, world=2, progress=False)
    finalize(plan)
    two = TeacherCache(tmp_path / "two")
    assert [s["sha256"] for s in two.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]


def test_disk_full_leaves_no_manifest_and_resumes(setup, tmp_path, monkeypatch):
    real_open, calls = open, []

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        calls.append(path)
        return Full(fh) if "shard-00002" in str(path) else fh

    monkeypatch.setattr(fileio_mod, "open", fake_open, raising=False)  # where every shard is written
    with pytest.raises(UserError, match="out of disk space"):
        build(setup, tmp_path / "c")
    out = tmp_path / "c"
    assert not (out / MANIFEST).exists() and not any(fileio_mod.is_temp(p.name) for p in out.iterdir())
    assert (out / shard_name(1)).is_file() and not (out / shard_name(2)).exists()
    monkeypatch.undo()
    TeacherCache(build(setup, out)).verify()


def test_check_names_what_differs(setup, tiny_tokenizer, make_tokenizer, make_model_dir, write_jsonl, tmp_path):
    cache = TeacherCache(build(setup, tmp_path / "c", temperature=2.0))
    dataset = load_dataset([setup[1]], tiny_tokenizer, SEQ_LEN)
    cache.check(
        tokenizer=tiny_tokenizer, dataset_fingerprint=dataset_fingerprint(dataset), temperature=2.0, teacher=setup[0]
    )
    other_data = load_dataset(
        [write_jsonl("other.jsonl", [{"text": "something else entirely"}])], tiny_tokenizer, SEQ_LEN
    )
    cases = [
        ({"tokenizer": make_tokenizer(280)}, "another tokenizer"),
        ({"dataset_fingerprint": dataset_fingerprint(other_data)}, "other data"),
        ({"temperature": 1.0}, "temperature 2.0"),
        ({"teacher": make_model_dir("other-teacher", seed=1)}, "another teacher"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(UserError, match=needle):
            cache.check(**kwargs)


def test_corrupted_truncated_and_foreign_caches_are_refused(setup, tmp_path):
    out = build(setup, tmp_path / "c")
    shard = out / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{shard_name(1)}: checksum mismatch"):
        TeacherCache(out).verify()
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(UserError, match=f"{shard_name(1)}: .*truncated"):
        TeacherCache(out)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="version 99.*rebuild"):
        TeacherCache(out)
    with pytest.raises(UserError, match="other settings"):
        build(setup, out, k=8)


def test_bfloat16_teacher_build_is_recorded_and_close_to_float32(setup, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    fp32 = TeacherCache(build(setup, tmp_path / "fp32", k=vocab, encoding="lossless"))
    bf16 = TeacherCache(build(setup, tmp_path / "bf16", k=vocab, encoding="lossless", dtype="bfloat16"))
    assert (fp32.manifest["teacher"]["dtype"], bf16.manifest["teacher"]["dtype"]) == ("float32", "bfloat16")
    _, dataset = teacher_logits(setup, tiny_tokenizer)
    mask = stored_mask(dataset)
    a, b = fp32.targets(range(len(dataset))), bf16.targets(range(len(dataset)))
    dense = [torch.full((int(mask.sum()), vocab), 0.0).scatter(-1, t.ids[mask], t.logprobs[mask]) for t in (a, b)]
    assert not torch.equal(dense[0], dense[1])  # the teacher did run in bfloat16
    p = dense[0].double().exp()
    kl = (p * (dense[0].double() - dense[1].double())).sum(-1).mean().item()
    assert kl < 1e-2  # bf16 weights: a small, not a lossless, change of the targets
    with pytest.raises(UserError, match="other settings"):  # the dtype is part of the cache's settings
        build(setup, tmp_path / "bf16", k=vocab, encoding="lossless")
    with pytest.raises(UserError, match="--dtype must be one of"):
        build(setup, tmp_path / "c", dtype="int8")
    assert not (tmp_path / "c").exists()


def test_bad_k_is_refused_before_writing(setup, tiny_tokenizer, tmp_path):
    for k, needle in ((0, "--k must be >= 1"), (len(tiny_tokenizer) + 1, "exceeds the vocabulary size")):
        with pytest.raises(UserError, match=needle):
            build(setup, tmp_path / "c", k=k)
        assert not (tmp_path / "c").exists()


def test_cli_build_verify_info_and_one_line_errors(setup, tmp_path, run_main):
    teacher, data = setup
    out = tmp_path / "cache"
    proc = run_main("cache", "build", "--teacher", teacher, "--data", data, "--out", out, "--k", "8", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    proc = run_main("cache", "verify", out)
    assert proc.returncode == 0 and "k=8" in proc.stdout and "bytes/token" in proc.stdout, proc.stderr
    info = json.loads(run_main("cache", "info", out).stdout)
    assert info["k"] == 8 and info["tokens"] > 0 and math.isclose(info["temperature"], 1.0)
    (out / MANIFEST).unlink()
    proc = run_main("cache", "info", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "interrupted" in proc.stderr
    proc = run_main("cache", "build", "--teacher", teacher, "--data", data, "--out", out, "--k", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--k must be >= 1" in proc.stderr


def test_cli_help_subprocess(run_cli, assert_one_line_error):
    proc = run_cli("cache", "build", "--help")
    assert proc.returncode == 0 and "--encoding" in proc.stdout
    assert_one_line_error(run_cli("cache", "verify", "/nonexistent-cache"), "no such teacher cache")


def test_student_with_trimmed_vocabulary_gets_ids_in_its_vocabulary(setup, tmp_path, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.models.vocab import load_id_map
    from potstill.student.init import init_student

    teacher, data = setup
    student = init_student(teacher, 1, tmp_path / "student", tiny_corpus, calib_tokens=64, calib_seq_len=16)
    id_map = load_id_map(student)
    vocab = len(id_map)
    cache = TeacherCache(build(setup, tmp_path / "c", k=vocab, encoding="lossless", student=student))
    assert cache.manifest["student"]["id_map_sha256"] and cache.manifest["vocab_size"] == vocab
    dataset = load_dataset([data], AutoTokenizer.from_pretrained(student), SEQ_LEN)
    online = OnlineTeacher(AutoModelForCausalLM.from_pretrained(teacher), id_map=id_map)
    logits = online.logits(dataset.input_ids[:BATCH], dataset.attention_mask[:BATCH])
    mask = stored_mask(dataset)[:BATCH]
    got = cache.targets(range(BATCH))
    full = torch.log_softmax(logits, dim=-1)[mask]
    assert torch.equal(torch.full_like(full, float("nan")).scatter(-1, got.ids[mask], got.logprobs[mask]), full)
