"""Intermediate-layer distillation: the student's hidden states pulled toward the teacher's, layer by layer.

For each mapped pair (student layer s, teacher layer t), at every scored position (`scored_mask`: position i,
whose next token is scored), the distance between the two layers' outputs after a parameter-free layer norm
(zero mean, unit variance over the hidden dimension, so the term does not depend on the residual stream's scale,
which grows with depth and differs between models):

    mse:    d(h_s, h_t) = mean_j (LN(P h_s)_j - LN(h_t)_j)^2
    cosine: d(h_s, h_t) = 1 - cos(P h_s, h_t)

with P the learned projection where the widths differ (identity otherwise). The term is

    H = (1 / n_layers) sum_pairs sum_scored d / num_tokens

normalized like the KD and CE terms (one division by the step's global count of scored positions), so it splits
across gradient accumulation and ranks exactly. Matching normalized intermediate states is the layer-wise part of
TinyBERT / MiniLM-style distillation.

TED (Liang et al. 2023) matches the outputs of task-aware filters instead: `TaskFilter` is one such filter,
g(h) = A LN(h) + b. With filters the term is the same sum with P h_s -> g_s(h_s) and h_t -> g_t(h_t) (the teacher's
filters frozen after their first training stage, `potstill.train.filters`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("mse", "cosine")


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-position distance between hidden states.

    Args:
        student: [N, H] student states (already projected to the teacher's width).
        teacher: [N, H] teacher states.
        distance: "mse" (layer-normalized squared difference, mean over H) or "cosine" (1 - cosine similarity).

    Returns:
        [N] float32 distances (>= 0).
    """
    s, t = student.float(), teacher.float()
    if distance == "mse":
        width = s.shape[-1:]
        return (F.layer_norm(s, width) - F.layer_norm(t, width)).pow(2).mean(-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise ValueError(f"unknown hidden-state distance {distance!r}; expected one of {DISTANCES}")


class TaskFilter(nn.Module):
    """TED's task-aware filter of one layer: g(h) = A LN(h) + b, LN = parameter-free layer norm over the width.

    The layer norm puts every layer's residual stream on one scale (it grows with depth), so one learning rate
    fits all filters. `A` starts as the identity when the widths agree (the filter starts as "the state itself"),
    else as nn.Linear's default.

    Args:
        d_in: the width of the states it reads ([..., d_in]).
        d_out: the width of its output ([..., d_out]).
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        if d_in == d_out:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(d_in))
                self.linear.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_out], in the filter's dtype."""
        h = h.to(self.linear.weight.dtype)
        return self.linear(F.layer_norm(h, h.shape[-1:]))


def hidden_term(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    distance: str,
    num_tokens: torch.Tensor | int | None = None,
    projections: Sequence[nn.Module] | None = None,
) -> torch.Tensor:
    """The hidden-state term H of one micro-batch.

    Args:
        student_states: one [B, T, H_s] tensor per mapped pair (the student layer's output).
        teacher_states: the matching [B, T, H_t] teacher outputs (no gradient needed).
        mask: [B, T - 1] bool, `scored_mask(labels)`: the positions that count (the last position predicts nothing).
        distance: see `hidden_distance`.
        num_tokens: the step's global count of scored positions (None: this batch's `mask.sum()`).
        projections: one module per pair mapping H_s -> H_t (a projection or the student's `TaskFilter`), or None
            (equal widths, raw states).

    Returns:
        Scalar: the sum over pairs and scored positions of the distance, / (pairs * num_tokens); 0 when nothing
        is scored.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"hidden_term: {len(student_states)} student vs {len(teacher_states)} teacher states")
    count = mask.sum() if num_tokens is None else num_tokens
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_states, teacher_states, strict=True)):
        s, t = s[:, :-1][mask], t[:, :-1][mask]
        if projections is not None:
            s = projections[i](s)
        total = total + hidden_distance(s, t, distance).sum()
    return total / (len(student_states) * torch.clamp(torch.as_tensor(count, device=total.device), min=1))
