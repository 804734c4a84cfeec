"""DistillTrainer on the fused chunked loss (the default) == on the dense loss: same loss, parts and gradients.

Runs on conftest's `models_dir` (student hidden 32, teacher 64, vocab 300) with distill_helpers' trainers.
"""

from __future__ import annotations

import pytest
import torch

from distill_helpers import make_trainer, online_teacher, ragged_batch, step_grads
from potstill.config import LossConfig


def _pair(models_dir, tmp_path, teacher, **loss):
    """Two trainers on the same student and teacher: fused (small chunks, so several run) and dense."""
    fused = make_trainer(models_dir, tmp_path, LossConfig(fused=True, chunk_size=5, **loss), teacher)
    dense = make_trainer(models_dir, tmp_path, LossConfig(fused=False, **loss), teacher)
    return fused, dense


@pytest.mark.parametrize(("name", "alpha"), [("fkl", 0.7), ("jsd", 0.3), ("rkl", 0.0), ("tvd", 1.0)])
def test_fused_step_equals_dense_step(models_dir, tmp_path, name, alpha):
    teacher = online_teacher(models_dir)
    fused, dense = _pair(models_dir, tmp_path, teacher, name=name, alpha=alpha, temperature=2.0)
    micro = [ragged_batch(2, seed=0), ragged_batch(3, seed=1)]  # grad accumulation over ragged masks
    for a, b in zip(step_grads(fused, micro), step_grads(dense, micro), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The logged KD / CE parts too (summed over the step's micro-batches).
    torch.testing.assert_close(fused._sums, dense._sums, rtol=1e-6, atol=1e-9)


def test_fused_path_never_makes_full_logits(models_dir, tmp_path):
    fused, dense = _pair(models_dir, tmp_path, online_teacher(models_dir), alpha=0.5)
    batch = ragged_batch(2, seq=12)
    loss_f, out_f = fused.compute_loss(fused.model, batch, return_outputs=True)
    loss_d, out_d = dense.compute_loss(dense.model, batch, return_outputs=True)
    assert out_f.logits.shape[1] == 1 and out_d.logits.shape[1] == 12
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-6, atol=1e-7)


def test_alpha_auto_and_grad_ratio_match_dense(models_dir, tmp_path):
    fused, dense = _pair(models_dir, tmp_path, online_teacher(models_dir), alpha="auto", temperature=2.0)
    for trainer in (fused, dense):
        step_grads(trainer, [ragged_batch(4)])
    assert fused.alpha == pytest.approx(dense.alpha, rel=1e-5) and 0 < fused.alpha < 1
    logs_f, logs_d = {"loss": 1.0}, {"loss": 1.0}
    fused.log(logs_f)
    dense.log(logs_d)
    for key in ("kd", "ce", "grad_ratio"):
        assert logs_f[key] == pytest.approx(logs_d[key], rel=1e-5), key


def test_unusual_student_head_falls_back_to_dense(models_dir, tmp_path):
    trainer = make_trainer(models_dir, tmp_path, LossConfig(fused=True, alpha=0.5), online_teacher(models_dir))
    trainer.model.config.logit_scale = 2.0  # a head the fused path does not reproduce: head_of -> None
    _, outputs = trainer.compute_loss(trainer.model, ragged_batch(2, seq=12), return_outputs=True)
    assert outputs.logits.shape[1] == 12
