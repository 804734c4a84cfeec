"""Embedding distillation: a student places an item where the teacher embeds it (cross-modal: an image where a text
teacher embeds its caption).

Three objectives between student vectors s [B, D] and teacher vectors t [B, D] (t unit vectors, as a sentence
encoder gives them), each a mean over the B items:

- cosine: 1 - cos(s, t);
- mse: ||s - t||^2 (the student must also match the norm);
- contrastive: InfoNCE over the batch, both directions (image -> text and text -> image), logits
  cos(s_i, t_j) / tau; items whose teacher vectors are identical (duplicate captions) are all positives, with
  equal weight, so a duplicate is never pushed away as a negative.

    loss = embedding_loss(student_vectors, teacher_vectors, "contrastive", tau=0.05)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from potstill.errors import UserError

EMBEDDING_LOSSES = ("cosine", "mse", "contrastive")


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float = 0.05) -> torch.Tensor:
    """Scalar distillation loss of a batch of embeddings.

    Args:
        student: [B, D] student vectors (any norm).
        teacher: [B, D] teacher vectors (unit norm for "contrastive"'s duplicate test).
        kind: one of EMBEDDING_LOSSES.
        tau: temperature of the contrastive logits (> 0).

    Returns:
        Scalar float32 (float64 for float64 input) loss, mean over items.

    Raises:
        UserError: an unknown kind, shapes that differ, or tau <= 0.
    """
    if kind not in EMBEDDING_LOSSES:
        raise UserError(f"embedding loss: kind must be one of {EMBEDDING_LOSSES} (got {kind!r})")
    if student.ndim != 2 or student.shape != teacher.shape:
        raise UserError(
            f"embedding loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be [B, D]; "
            "project the student to the teacher's width first"
        )
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return (s - t).pow(2).sum(-1).mean()
    if tau <= 0:
        raise UserError(f"embedding loss: contrastive tau must be > 0 (got {tau})")
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    logits = s @ t.T / tau  # [B, B]: image i vs caption j
    same = (t @ t.T) > 1 - 1e-6  # duplicates of a caption are positives too
    target = same / same.sum(-1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(-1)).sum(-1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
