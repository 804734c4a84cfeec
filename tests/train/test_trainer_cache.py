"""DistillTrainer from a teacher cache (`teacher.source: cache`) == from the online teacher.

The trainer only needs `cache.targets(indices) -> SparseTargets [B, L, k]`; `TopkCache` below provides that from
a teacher's logits (what a lossless cache stores), so these tests pin the trainer's side whatever the on-disk
format. Runs on conftest's `models_dir` (student hidden 32, teacher 64, vocab 300) with distill_helpers'
trainers.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_helpers import (
    VOCAB,
    make_cfg,
    make_trainer,
    online_teacher,
    overrides_for,
    ragged_batch,
    read_log,
    step_grads,
)
from potstill.config import LossConfig
from potstill.data import collate, load_dataset
from potstill.losses.sparse import SparseTargets, topk_targets
from potstill.teacher.online import OnlineTeacher
from potstill.train.recipes import run_distill
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer, IndexedDataset


class TopkCache:
    """Top-k targets of `teacher` on the sequences of `input_ids` ([N, L]), looked up by sequence index."""

    def __init__(self, teacher: OnlineTeacher, input_ids: torch.Tensor, mask: torch.Tensor, k: int, temperature: float):
        self.targets_all = topk_targets(teacher.logits(input_ids, mask), k, temperature)
        self.calls = 0

    def targets(self, indices: torch.Tensor) -> SparseTargets:
        self.calls += 1
        return self.targets_all.rows(indices)


def _indexed(batch: dict) -> dict:
    return {**batch, "index": torch.arange(len(batch["input_ids"]))}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_cache_at_k_equal_vocab_equals_online_teacher(models_dir, tmp_path, fused, name):
    loss = LossConfig(name=name, alpha=0.6, temperature=2.0, fused=fused)
    teacher = online_teacher(models_dir)
    batch = _indexed(ragged_batch(4))
    cache = TopkCache(teacher, batch["input_ids"], batch["attention_mask"], k=VOCAB, temperature=2.0)
    online = make_trainer(models_dir, tmp_path, loss, teacher)
    cached = DistillTrainer(model=online.model.__class__.from_pretrained(models_dir / "student"),
                            args=online.args, teacher=None, teacher_cache=cache, loss_cfg=loss)  # fmt: skip
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    for a, b in zip(step_grads(online, halves), step_grads(cached, halves), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached._sums, online._sums, rtol=1e-5, atol=1e-7)
    assert cache.calls == 2


def test_cache_without_index_is_refused(models_dir, tmp_path):
    batch = ragged_batch(2)
    cache = TopkCache(online_teacher(models_dir), batch["input_ids"], batch["attention_mask"], k=8, temperature=1.0)
    trainer = DistillTrainer(model=AutoModelForCausalLM.from_pretrained(models_dir / "student"),
                             args=training_args(make_cfg(models_dir, tmp_path / "run")), teacher=None,
                             teacher_cache=cache, loss_cfg=LossConfig(alpha=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="IndexedDataset"):
        trainer.compute_loss(trainer.model, batch)


def _train(models_dir, tmp_path, teacher, cache, steps: int) -> tuple[list[float], dict]:
    """Train the student `steps` steps on train.jsonl (seq 16, batch 2); (loss per step, final weights)."""
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "student")
    data = IndexedDataset(load_dataset([models_dir / "train.jsonl"], tokenizer, 16))
    cfg = make_cfg(models_dir, tmp_path, f"train.max_steps={steps}", "train.logging_steps=1", "loss.alpha=0.9")
    student = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    trainer = DistillTrainer(model=student, args=training_args(cfg), train_dataset=data, data_collator=collate,
                             teacher=teacher, teacher_cache=cache, loss_cfg=cfg.loss)  # fmt: skip
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, {k: v.clone() for k, v in student.state_dict().items()}


def test_cached_training_at_k64_tracks_online_training(models_dir, tmp_path):
    teacher_model = AutoModelForCausalLM.from_pretrained(models_dir / "teacher")
    with torch.no_grad():
        teacher_model.lm_head.weight.mul_(50.0)  # a confident teacher, as trained ones are: ~1% of mass beyond top-64
    teacher = OnlineTeacher(teacher_model)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "student")
    packed = load_dataset([models_dir / "train.jsonl"], tokenizer, 16)
    cache = TopkCache(teacher, packed.input_ids, packed.attention_mask, k=64, temperature=2.0)
    assert 0 < cache.targets_all.tail.max() < 0.05

    online_loss, online_w = _train(models_dir, tmp_path / "online", teacher, None, 12)
    cached_loss, cached_w = _train(models_dir, tmp_path / "cached", None, cache, 12)  # no teacher model
    assert online_loss[-1] < online_loss[0] and cached_loss[-1] < cached_loss[0]
    for a, b in zip(online_loss, cached_loss, strict=True):
        assert b == pytest.approx(a, rel=0.01)  # measured: 0.2%
    start = AutoModelForCausalLM.from_pretrained(models_dir / "student").state_dict()
    moved = sum((online_w[k] - start[k]).norm() ** 2 for k in start) ** 0.5
    apart = sum((online_w[k] - cached_w[k]).norm() ** 2 for k in start) ** 0.5
    assert apart < 0.05 * moved  # measured: 2%; the two runs move the student the same way


def test_cache_source_needs_a_cache_path(models_dir, tmp_path):
    from potstill.errors import UserError

    with pytest.raises(UserError, match="teacher.cache"):
        run_distill(make_cfg(models_dir, tmp_path / "run", "teacher.source=cache"))
    assert not (tmp_path / "run").exists()


# ---- run_distill on a cache written by `potstill cache build` ----


@pytest.fixture(scope="module")
def lossless_cache(models_dir, tmp_path_factory):
    """A k = V lossless cache of the teacher on train.jsonl, packed like make_cfg's runs (seq 16, T = 2)."""
    from potstill.teacher.cache import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    return build_cache(models_dir / "teacher", [models_dir / "train.jsonl"], out, k=VOCAB, temperature=2.0,
                       seq_len=16, encoding="lossless", student=models_dir / "student", progress=False)  # fmt: skip


def test_run_from_lossless_cache_equals_online_run(models_dir, tmp_path, lossless_cache):
    opts = ("train.max_steps=4", "loss.name=jsd")
    online = run_distill(make_cfg(models_dir, tmp_path / "online", *opts))
    cached = run_distill(make_cfg(models_dir, tmp_path / "cached", *opts, "teacher.source=cache",
                                  f"teacher.cache={lossless_cache}", "model.teacher=null"))  # fmt: skip
    for a, b in zip(read_log(online), read_log(cached), strict=True):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.parametrize(("override", "needle"), [("data.seq_len=24", "other data"), ("loss.temperature=1.0", "temp")])
def test_mismatched_cache_is_refused_before_training(
    models_dir, tmp_path, lossless_cache, distill_error, override, needle
):
    out = tmp_path / "run"
    args = overrides_for(
        models_dir, out, "train.max_steps=1", "teacher.source=cache", f"teacher.cache={lossless_cache}"
    )
    assert needle in distill_error(*args, override)
    assert not out.exists()
