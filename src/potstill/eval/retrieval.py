"""Zero-shot retrieval: rank a gallery of captions for each image; recall@k with ties broken fairly.

`recall_at_k` counts, for each query, whether its true gallery item is among the k best scored. A model that scores
only at a coarse level (e.g. a classifier: every caption of the predicted class gets the same score) produces ties;
they are counted as the expectation under a uniformly random order of the tied items, never in the model's favour
or against it: with g items strictly better than the true one and e others tied with it,
P(rank < k) = clamp((k - g) / (e + 1), 0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from potstill.errors import UserError


def recall_at_k(scores: torch.Tensor, truth: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Mean recall@k of queries against a gallery.

    Args:
        scores: [Q, G] score of gallery item g for query q (higher = better).
        truth: [Q] index of each query's true gallery item.
        ks: the cut-offs.

    Returns:
        {"recall@k": mean over queries} for each k, and "queries", "gallery" counts.
    """
    if scores.ndim != 2 or truth.shape != scores.shape[:1] or int(truth.max()) >= scores.shape[1]:
        raise UserError(f"retrieval: scores [Q, G] {tuple(scores.shape)} and truth [Q] {tuple(truth.shape)} do not fit")
    s = scores.double()
    true = s.gather(1, truth.long()[:, None])
    better = (s > true).sum(-1).double()
    tied = (s == true).sum(-1).double() - 1
    out = {f"recall@{k}": float(((k - better) / (tied + 1)).clamp(0, 1).mean()) for k in ks}
    return out | {"queries": scores.shape[0], "gallery": scores.shape[1]}
