"""Classifier distillation loop: a tiny CNN student moves toward a tiny CNN teacher; seeded; bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from potstill.errors import UserError
from potstill.eval.classifier import agreement, ms_per_image, predict
from potstill.losses import Divergence
from potstill.losses.sparse import topk_targets
from potstill.train.classifier import fit_classifier


def _cnn(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 6)
    )


def test_kd_on_cached_targets_lowers_kl_and_is_seeded():
    teacher, student = _cnn(0, 16), _cnn(1, 4)
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logits = teacher(x) * 3
    targets = topk_targets(t_logits, 6, temperature=1.0)
    before = agreement(predict(student, x), targets)["overall"]["kl_to_teacher"]
    div = Divergence("fkl")
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    hist = fit_classifier(a, x, targets.ids[:, 0], targets, div, 1.0, steps=40, batch_size=16, lr=0.02, progress=False)
    after = agreement(predict(a, x), targets)["overall"]["kl_to_teacher"]
    assert after < 0.7 * before, (before, after)
    fit_classifier(b, x, targets.ids[:, 0], targets, div, 1.0, steps=40, batch_size=16, lr=0.02, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # same seed, same batches, same result
    assert len(hist) == 40


def test_fit_refuses_kd_without_teacher_and_mismatched_lengths():
    student = _cnn(0, 4)
    x = torch.randn(8, 3, 12, 12)
    with pytest.raises(UserError, match="alpha=0.5 needs teacher targets"):
        fit_classifier(student, x, torch.zeros(8, dtype=torch.long), None, Divergence(), 0.5, steps=1)
    with pytest.raises(UserError, match="8 inputs but 7 labels"):
        fit_classifier(student, x, torch.zeros(7, dtype=torch.long), None, Divergence(), 0.0, steps=1)


def test_agreement_metrics_by_hand_and_sparse_equals_dense():
    teacher = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6]])
    student = torch.tensor([[5.0, 4, 3, 2, -9, 1, 0], [6, 5, 4, 3, 2, 1, 0]])
    dense = agreement(student, teacher, ["x", "y"])
    # item 0: same top-1, top-5 {0,1,2,3,5} vs {0,1,2,3,4}: 4/5; item 1: top-1 0 vs 6, top-5 {0..4} vs {2..6}: 3/5
    assert dense["overall"]["top1_agreement"] == 0.5
    assert dense["overall"]["top5_overlap"] == pytest.approx(0.7)
    assert dense["domains"]["y"]["top1_agreement"] == 0.0 and dense["domains"]["x"]["items"] == 1
    p, q = teacher.softmax(-1).double(), student.softmax(-1).double()
    kl = (p * (p.log() - q.log())).sum(-1)
    assert dense["overall"]["kl_to_teacher"] == pytest.approx(float(kl.mean()), rel=1e-5)
    sparse = agreement(student, topk_targets(teacher, 7), ["x", "y"])
    assert sparse["overall"] == pytest.approx(dense["overall"], rel=1e-5)
    with pytest.raises(UserError, match="k >= 5"):
        agreement(student, topk_targets(teacher, 3))


def test_ms_per_image_times_every_model():
    small, big = _cnn(0, 2), _cnn(0, 64)
    x = torch.randn(4, 3, 32, 32)
    ms = ms_per_image({"small": (small, x), "big": (big, x)}, rounds=2)
    assert set(ms) == {"small", "big"} and all(v > 0 for v in ms.values())
