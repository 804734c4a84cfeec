"""The hidden-state term: its distances, its normalization (splits of a batch add up), masking, projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from potstill.losses.hidden import hidden_distance, hidden_term


def test_mse_distance_is_that_of_layer_normalized_states():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    norm = lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)  # noqa: E731
    expected = ((norm(s) - norm(t)) ** 2).mean(-1)
    torch.testing.assert_close(hidden_distance(s, t, "mse").double(), expected, rtol=1e-5, atol=1e-6)
    # scale-free: the residual stream's magnitude (it grows with depth) does not matter, a shift neither
    torch.testing.assert_close(
        hidden_distance(7.0 * s + 3.0, t, "mse"), hidden_distance(s, t, "mse"), atol=1e-4, rtol=0
    )
    assert hidden_distance(s, s, "mse").abs().max() < 1e-6


def test_cosine_distance():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    torch.testing.assert_close(hidden_distance(s, t, "cosine"), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="unknown hidden-state distance"):
        hidden_distance(s, t, "l1")


def _batch(seed: int, b: int = 4, seq: int = 6, width: int = 8):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(b, seq, width, generator=g) for _ in range(2)]
    targets = [torch.randn(b, seq, width, generator=g) for _ in range(2)]
    mask = torch.rand(b, seq - 1, generator=g) > 0.3
    return states, targets, mask


def test_term_is_the_mean_over_pairs_and_scored_positions():
    states, targets, mask = _batch(0)
    pairs = zip(states, targets, strict=True)
    expected = sum(hidden_distance(s[:, :-1][mask], t[:, :-1][mask], "mse").sum() for s, t in pairs)
    got = hidden_term(states, targets, mask, "mse")
    torch.testing.assert_close(got, expected / (2 * mask.sum()))


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_splits_of_a_batch_add_up_to_the_whole(distance):
    """Each micro-batch divides by the step's global count: the parts sum to the whole (grad accumulation, ranks)."""
    states, targets, mask = _batch(1)
    whole = hidden_term(states, targets, mask, distance)
    count = mask.sum()
    parts = sum(
        hidden_term([s[i : i + 2] for s in states], [t[i : i + 2] for t in targets], mask[i : i + 2], distance, count)
        for i in (0, 2)
    )
    torch.testing.assert_close(parts, whole)


def test_nothing_scored_is_zero_and_positions_outside_the_mask_carry_no_gradient():
    states, targets, mask = _batch(2)
    assert hidden_term(states, targets, torch.zeros_like(mask), "mse").item() == 0.0
    leaf = states[0].clone().requires_grad_(True)
    hidden_term([leaf, states[1]], targets, mask, "mse").backward()
    grad = leaf.grad[:, :-1]
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().sum() > 0
    assert leaf.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_projections_map_the_student_width_and_learn():
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(2, 5, 4, generator=g)]
    targets = [torch.randn(2, 5, 8, generator=g)]
    mask = torch.ones(2, 4, dtype=torch.bool)
    proj = nn.ModuleList([nn.Linear(4, 8, bias=False)])
    before = hidden_term(states, targets, mask, "mse", projections=proj)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        hidden_term(states, targets, mask, "mse", projections=proj).backward()
        opt.step()
    assert hidden_term(states, targets, mask, "mse", projections=proj) < 0.8 * before
    with pytest.raises(ValueError, match="1 student vs 2 teacher"):
        hidden_term(states, targets * 2, mask, "mse")
