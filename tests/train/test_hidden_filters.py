"""TED's task-aware filters (`hidden.filters`): stage 1 lowers the filters' task loss, the filtered term is the
direct formula, a resumed run is exact (the teacher's filters retrained bit for bit, the student's checkpointed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_helpers import loss_and_grads, make_cfg, pair_models, ragged_batch
from potstill.data import load_dataset
from potstill.models.load import load_tokenizer
from potstill.teacher.online import OnlineTeacher
from potstill.train.filters import train_teacher_filters
from potstill.train.hidden import hidden_plan
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer


def _train_ds(root, cfg):
    return load_dataset(cfg.data.train, load_tokenizer(root / "student"), cfg.data.seq_len, cfg.data.add_bos, False)


def test_stage_one_lowers_the_filters_task_loss(pruned, tmp_path):
    cfg = make_cfg(pruned, tmp_path / "r", "hidden.weight=1", "hidden.filters.steps=40", "hidden.filters.lr=1e-2")
    _, model = pair_models(pruned)
    filters, losses = train_teacher_filters(cfg, OnlineTeacher(model), _train_ds(pruned, cfg), (0, 3), progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert not any(p.requires_grad for p in filters.parameters())


def _filtered_trainer(root, tmp_path, *extra):
    cfg = make_cfg(root, tmp_path / "run", "loss.alpha=0.5", "hidden.weight=0.7", "hidden.filters.steps=3", *extra)
    student, teacher = pair_models(root)
    online = OnlineTeacher(teacher)
    plan = hidden_plan(cfg, student, online, _train_ds(root, cfg))
    trainer = DistillTrainer(
        model=student, args=training_args(cfg), teacher=online, loss_cfg=cfg.loss, hidden=(plan, cfg.hidden.weight)
    )
    return trainer, plan


def test_the_filtered_term_is_the_direct_formula(pruned, tmp_path):
    """loss(with filters) - loss(without the term) = w * mean_pairs mean_scored mean_j (LN(g_s h_s) - LN(g_t h_t))^2."""
    batch = ragged_batch(4, seed=6)
    with_f, plan = _filtered_trainer(pruned, tmp_path)
    assert plan.teacher_filters is not None and plan.teacher_layers == (0, 3)
    # the student's filters start as copies of the teacher's (equal widths)
    for g_s, g_t in zip(plan.projections, plan.teacher_filters, strict=True):
        torch.testing.assert_close(g_s.linear.weight, g_t.linear.weight, rtol=0, atol=0)
    without = DistillTrainer(
        model=next(pair_models(pruned)), args=with_f.args, teacher=with_f.teacher, loss_cfg=with_f.loss_cfg
    )
    (l_f, _), (l_0, _) = loss_and_grads(with_f, [batch]), loss_and_grads(without, [batch])
    student, teacher = pair_models(pruned)
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        t = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        per_pair = []
        for g_s, g_t, hs, ht in zip(plan.projections, plan.teacher_filters, (s[1], s[2]), (t[1], t[4]), strict=True):
            a = g_s.linear(F.layer_norm(hs, hs.shape[-1:]))[:, :-1][mask]
            b = g_t.linear(F.layer_norm(ht, ht.shape[-1:]))[:, :-1][mask]
            a, b = F.layer_norm(a, a.shape[-1:]), F.layer_norm(b, b.shape[-1:])
            per_pair.append((a - b).pow(2).mean(-1).mean())
    direct = sum(per_pair) / 2
    assert direct > 0
    assert l_f - l_0 == pytest.approx(0.7 * direct.item(), rel=1e-4)
