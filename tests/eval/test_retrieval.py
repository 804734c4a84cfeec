"""recall@k with ties counted at their expected value under a random order."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import UserError
from potstill.eval.retrieval import recall_at_k


def test_perfect_and_wrong_rankings():
    scores = torch.eye(6)
    assert recall_at_k(scores, torch.arange(6)) == {"recall@1": 1.0, "recall@5": 1.0, "queries": 6, "gallery": 6}
    worst = recall_at_k(-torch.eye(6), torch.arange(6))  # the true item is last of 6
    assert worst["recall@1"] == 0.0 and worst["recall@5"] == 0.0


def test_ties_count_at_their_expectation():
    flat = recall_at_k(torch.zeros(3, 10), torch.tensor([0, 4, 9]))
    assert flat["recall@1"] == pytest.approx(0.1) and flat["recall@5"] == pytest.approx(0.5)
    # one item strictly better, the true one tied with 3 others: P(rank < 1) = 0, P(rank < 5) = 1
    scores = torch.tensor([[2.0, 1, 1, 1, 1, 0, 0]])
    r = recall_at_k(scores, torch.tensor([1]), ks=(1, 2, 5))
    assert (r["recall@1"], r["recall@2"], r["recall@5"]) == (0.0, pytest.approx(0.25), 1.0)


def test_mismatched_shapes_are_one_line():
    with pytest.raises(UserError, match="do not fit"):
        recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1]))
