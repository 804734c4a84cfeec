"""The KD objective for classifiers: [batch, classes] logits, one prediction per item instead of per token.

The same divergences, temperature, alpha, T^2 weighting (`combine` / `kd_weights`) and normalization as text KD:
an item is a "token" with no shift. Each term is a sum over the scored items (label != -100) divided once by
`num_items` (the global count across gradient accumulation and ranks); an all-masked batch gives 0. The teacher is
dense logits or sparse top-k targets from a cache (`potstill.losses.sparse`, renorm or bucket tail).

    terms = classifier_kd_terms(student_logits, teacher_logits, labels, Divergence("fkl", temperature=2.0))
    loss = combine(terms, alpha=0.9, temperature=2.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX, Divergence, KDTerms, per_token_divergence
from potstill.losses.sparse import SparseTargets, TailMode, sparse_divergence


def classifier_kd_terms(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTargets | None,
    labels: torch.Tensor,
    div: Divergence,
    num_items: int | torch.Tensor | None = None,
    tail: TailMode | None = None,
) -> KDTerms:
    """Distillation and cross-entropy terms of a batch of classifier outputs.

    Args:
        student_logits: [B, C] logits (bf16 is upcast inside).
        teacher: [B, C] teacher logits, SparseTargets with ids / logprobs [B, k] and tail [B], or None (CE only).
        labels: [B] class ids (e.g. the teacher's top-1 on unlabeled images); -100 = item carries no loss.
        div: the divergence (name, parameters, temperature, sparse_tail).
        num_items: the normalizer; defaults to this batch's scored items. Counts below 1 are treated as 1.
        tail: overrides `div.sparse_tail` for sparse targets.

    Returns:
        KDTerms(kd, ce, n_tokens = scored items); kd is None without a teacher.

    Raises:
        UserError: shapes that do not match ([B, C] student, [B] labels, teacher of the same B and C).
    """
    if student_logits.ndim != 2 or labels.shape != student_logits.shape[:1]:
        raise UserError(
            f"classifier KD: expected student logits [B, C] and labels [B], got {tuple(student_logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if isinstance(teacher, torch.Tensor) and teacher.shape != student_logits.shape:
        raise UserError(
            f"classifier KD: teacher logits {tuple(teacher.shape)} do not match the student's "
            f"{tuple(student_logits.shape)}; map the teacher's classes to the student's first"
        )
    if isinstance(teacher, SparseTargets) and (
        teacher.ids.shape[0] != len(labels) or int(teacher.ids.max()) >= student_logits.shape[1]
    ):
        raise UserError(
            f"classifier KD: sparse targets for {teacher.ids.shape[0]} items with class ids up to "
            f"{int(teacher.ids.max())} do not fit {len(labels)} items of {student_logits.shape[1]} classes"
        )
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    student = student_logits[rows]
    denom = torch.as_tensor(rows.numel() if num_items is None else num_items, device=student.device).clamp_min(1)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(student.to(dtype), labels[rows], reduction="sum") / denom
    kd = None
    if isinstance(teacher, SparseTargets):
        kd = sparse_divergence(student, teacher.rows(rows), div, tail).sum() / denom
    elif teacher is not None:
        kd = per_token_divergence(student, teacher[rows], div).sum() / denom
    return KDTerms(kd=kd, ce=ce, n_tokens=rows.numel())
