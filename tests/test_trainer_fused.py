"""DistillTrainer on the fused chunked loss (the default) == on the dense loss: same loss, parts and gradients.

Reuses test_trainer's tiny models (student hidden 32, teacher 64, vocab 300) and helpers.
"""

from __future__ import annotations

import pytest
import torch

from potstill.config import LossConfig
from test_trainer import _batch, _step_grads, _teacher, _trainer, models_dir  # noqa: F401 (a fixture)


def _pair(models_dir, tmp_path, teacher, **loss):  # noqa: F811
    """Two trainers on the same student and teacher: fused (small chunks, so several run) and dense."""
    fused = _trainer(models_dir, tmp_path, LossConfig(fused=True, chunk_size=5, **loss), teacher)
    dense = _trainer(models_dir, tmp_path, LossConfig(fused=False, **loss), teacher)
    return fused, dense


@pytest.mark.parametrize(("name", "alpha"), [("fkl", 0.7), ("jsd", 0.3), ("rkl", 0.0), ("tvd", 1.0)])
def test_fused_step_equals_dense_step(models_dir, tmp_path, name, alpha):  # noqa: F811
    teacher = _teacher(models_dir)
    fused, dense = _pair(models_dir, tmp_path, teacher, name=name, alpha=alpha, temperature=2.0)
    micro = [_batch(2, seed=0), _batch(3, seed=1)]  # grad accumulation over ragged masks
    for a, b in zip(_step_grads(fused, micro), _step_grads(dense, micro), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The logged KD / CE parts too (summed over the step's micro-batches).
    torch.testing.assert_close(fused._sums, dense._sums, rtol=1e-6, atol=1e-9)


def test_fused_path_never_makes_full_logits(models_dir, tmp_path):  # noqa: F811
    fused, dense = _pair(models_dir, tmp_path, _teacher(models_dir), alpha=0.5)
    batch = _batch(2, seq=12)
    loss_f, out_f = fused.compute_loss(fused.model, batch, return_outputs=True)
    loss_d, out_d = dense.compute_loss(dense.model, batch, return_outputs=True)
    assert out_f.logits.shape[1] == 1 and out_d.logits.shape[1] == 12
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-6, atol=1e-7)


def test_alpha_auto_and_grad_ratio_match_dense(models_dir, tmp_path):  # noqa: F811
    fused, dense = _pair(models_dir, tmp_path, _teacher(models_dir), alpha="auto", temperature=2.0)
    for trainer in (fused, dense):
        _step_grads(trainer, [_batch(4)])
    assert fused.alpha == pytest.approx(dense.alpha, rel=1e-5) and 0 < fused.alpha < 1
    logs_f, logs_d = {"loss": 1.0}, {"loss": 1.0}
    fused.log(logs_f)
    dense.log(logs_d)
    for key in ("kd", "ce", "grad_ratio"):
        assert logs_f[key] == pytest.approx(logs_d[key], rel=1e-5), key


def test_unusual_student_head_falls_back_to_dense(models_dir, tmp_path):  # noqa: F811
    trainer = _trainer(models_dir, tmp_path, LossConfig(fused=True, alpha=0.5), _teacher(models_dir))
    trainer.model.config.logit_scale = 2.0  # a head the fused path does not reproduce: head_of -> None
    _, outputs = trainer.compute_loss(trainer.model, _batch(2, seq=12), return_outputs=True)
    assert outputs.logits.shape[1] == 12
