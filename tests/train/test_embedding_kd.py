"""Cross-modal embedding KD: the loop moves student vectors onto the teacher's; the text teacher's pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.errors import UserError
from potstill.train.embedding import fit_embedder


def _task(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 12, generator=g)
    teacher = F.normalize(inputs @ torch.randn(12, 8, generator=g), dim=-1)  # a linear map exists
    return inputs, teacher


@pytest.mark.parametrize("kind", ["cosine", "mse", "contrastive"])
def test_fit_embedder_learns_the_teacher_space(kind):
    inputs, teacher = _task()
    torch.manual_seed(0)
    student = torch.nn.Linear(12, 8)
    before = F.cosine_similarity(student(inputs), teacher).mean().item()
    fit_embedder(student, inputs, teacher, kind, steps=150, batch_size=16, lr=2e-2, tau=0.1, progress=False)
    with torch.no_grad():
        after = F.cosine_similarity(student(inputs), teacher).mean().item()
        retrieved = (F.normalize(student(inputs), dim=-1) @ teacher.T).argmax(-1)
    assert after > max(0.8, before + 0.3)
    assert (retrieved == torch.arange(len(inputs))).float().mean() > 0.5


def test_lengths_must_match():
    inputs, teacher = _task()
    with pytest.raises(UserError, match="64 inputs but 63"):
        fit_embedder(torch.nn.Linear(12, 8), inputs, teacher[:-1], "cosine", steps=1, progress=False)
