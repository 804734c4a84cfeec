"""Embedding distillation losses: cosine, mse, contrastive (duplicates of a caption are positives, not negatives)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.errors import UserError
from potstill.losses.embedding import embedding_loss


def _pair(seed=0, b=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), F.normalize(
        torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1
    )


def test_cosine_and_mse_formulas():
    s, t = _pair()
    torch.testing.assert_close(embedding_loss(s, t, "cosine"), (1 - (F.normalize(s, dim=-1) * t).sum(-1)).mean())
    torch.testing.assert_close(embedding_loss(s, t, "mse"), ((s - t) ** 2).sum(-1).mean())
    assert float(embedding_loss(3 * t, t, "cosine")) == pytest.approx(0, abs=1e-12)  # direction only
    assert float(embedding_loss(3 * t, t, "mse")) > 1  # mse also wants the norm


def test_contrastive_is_symmetric_infonce_without_duplicates():
    s, t = _pair()
    logits = F.normalize(s, dim=-1) @ t.T / 0.1
    target = torch.arange(len(s))
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(embedding_loss(s, t, "contrastive", tau=0.1), expected)


def test_contrastive_duplicates_are_positives():
    s, t = _pair()
    t[1] = t[0]  # two images with the same caption
    logits = F.normalize(s, dim=-1) @ t.T / 0.1
    target = torch.eye(len(s), dtype=torch.float64)
    target[0, 1] = target[1, 0] = 1
    target = target / target.sum(-1, keepdim=True)
    i2t = -(target * logits.log_softmax(-1)).sum(-1).mean()
    t2i = -(target * logits.log_softmax(0)).sum(0).mean()
    torch.testing.assert_close(embedding_loss(s, t, "contrastive", tau=0.1), (i2t + t2i) / 2)
    # a student that places both images on their common caption loses less than one that separates them
    good = t.clone()
    bad = t.clone()
    bad[1] = -t[0]
    assert embedding_loss(good, t, "contrastive") < embedding_loss(bad, t, "contrastive")


@pytest.mark.parametrize(
    ("shape", "kind", "tau", "needle"),
    [((6, 7), "cosine", 0.05, "[B, D]"), ((6, 8), "l1", 0.05, "kind"), ((6, 8), "contrastive", 0.0, "tau")],
)
def test_bad_input_is_one_line(shape, kind, tau, needle):
    _, t = _pair()
    with pytest.raises(UserError, match=None) as err:
        embedding_loss(torch.zeros(shape), t.float(), kind, tau)
    assert needle in str(err.value) and "\n" not in str(err.value)
