"""The exact hidden-state cache (`cache build --targets hidden`): bf16 final states on disk, the teacher's head at
train time; the run equals the online teacher's up to bf16 rounding of the states, at any temperature."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import make_cfg, overrides_for, read_log
from potstill.data import load_dataset
from potstill.teacher.cache import TeacherCache, build_cache
from potstill.teacher.online import OnlineTeacher
from potstill.train.recipes import run_distill

SEQ = 16


@pytest.fixture(scope="module")
def hidden_cache(models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hcache") / "cache"
    return build_cache(
        models_dir / "teacher", [models_dir / "train.jsonl"], out, targets="hidden", seq_len=SEQ, batch_size=4,
        shard_tokens=4 * SEQ, progress=False,
    )  # fmt: skip


def test_the_cache_holds_the_teachers_final_states_in_bf16(models_dir, hidden_cache, tiny_tokenizer):
    cache = TeacherCache(hidden_cache)
    report = cache.verify()
    assert report["targets"] == "hidden" and report["k"] == 64 and cache.temperature is None
    # 2 bytes x H = 128 per position before zstd, a little less after
    assert 64 < report["bytes_per_token"] <= 2 * 64 + 8
    data = load_dataset([models_dir / "train.jsonl"], tiny_tokenizer, SEQ)
    teacher = OnlineTeacher(AutoModelForCausalLM.from_pretrained(models_dir / "teacher"))
    expected = teacher.head_inputs(data.input_ids[:3], data.attention_mask[:3]).hidden
    got = cache.states([0, 1, 2])
    stored = torch.zeros_like(data.labels[:3], dtype=torch.bool)
    stored[:, :-1] = data.labels[:3, 1:] != -100
    torch.testing.assert_close(got[stored], expected[stored].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert got[~stored].abs().max() == 0


@pytest.mark.parametrize(("temperature", "fused"), [("2.0", "true"), ("1.0", "false")])
def test_training_from_the_cache_matches_the_online_teacher(models_dir, hidden_cache, tmp_path, temperature, fused):
    opts = ("train.max_steps=3", f"loss.temperature={temperature}", f"loss.fused={fused}", "loss.alpha=0.5")
    online = read_log(run_distill(make_cfg(models_dir, tmp_path / "online", *opts)))
    cached = read_log(
        run_distill(
            make_cfg(models_dir, tmp_path / "cached", *opts, "teacher.source=cache", f"teacher.cache={hidden_cache}")
        )
    )
    for a, b in zip(online, cached, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=2e-2, abs=1e-4)  # bf16 states: ~3 significant digits
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-5)


def test_a_hidden_cache_needs_its_teacher(models_dir, hidden_cache, tmp_path, distill_error):
    base = overrides_for(models_dir, tmp_path / "x", "train.max_steps=1", "teacher.source=cache")
    line = distill_error(*base, f"teacher.cache={hidden_cache}", "model.teacher=null")
    assert "model.teacher" in line and "hidden states" in line
    line = distill_error(*base, f"teacher.cache={hidden_cache}", f"model.teacher={models_dir / 'student'}")
    assert "another teacher" in line
