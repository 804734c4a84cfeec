"""Classifier distillation on inputs already in memory.

`fit_classifier` trains the student's trainable parameters (the shared loop of `potstill.train.loop`) with the KD
objective of `potstill.losses.classifier` (alpha * T^2 * D + (1 - alpha) * CE, weights from `combine`), seeded: the
same seed gives the same batches and the same result. Inputs are tensors (pixels, or the outputs of a frozen front of
the student computed once), teacher targets come from an image teacher cache (sparse) or from teacher logits (dense).
"""

from __future__ import annotations

import torch
from torch import nn

from potstill.errors import UserError
from potstill.losses import Divergence, combine
from potstill.losses.classifier import classifier_kd_terms
from potstill.losses.sparse import SparseTargets
from potstill.train.loop import fit_loop


def fit_classifier(
    student: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | SparseTargets | None,
    div: Divergence,
    alpha: float,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `student` for `steps` AdamW steps on shuffled mini-batches (a new permutation each epoch).

    The student keeps the train / eval mode it is given (a fine-tuned network with frozen batch-norm statistics
    stays in eval mode); only parameters with requires_grad are updated.

    Args:
        student: maps inputs [b, ...] to logits [b, C].
        inputs: [N, ...] training inputs.
        labels: [N] hard labels (-100 = no loss on that item).
        teacher: [N, C] teacher logits, SparseTargets [N, k], or None (alpha must be 0).
        div: the divergence and temperature.
        alpha: weight of the KD term (0 = CE on `labels` only).
        steps: optimizer steps.
        batch_size: items per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the batch order.
        progress: show a progress bar.

    Returns:
        The loss of each step.

    Raises:
        UserError: a KD weight without teacher targets, no trainable parameter, or mismatching lengths.
    """
    if alpha > 0 and teacher is None:
        raise UserError(f"classifier KD: alpha={alpha} needs teacher targets (a cache or teacher logits)")
    if len(labels) != len(inputs):
        raise UserError(f"classifier KD: {len(inputs)} inputs but {len(labels)} labels")

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        targets = None if teacher is None or alpha == 0 else _rows(teacher, idx)
        return combine(classifier_kd_terms(student(inputs[idx]), targets, labels[idx], div), alpha, div.temperature)

    return fit_loop(student.parameters(), len(inputs), batch_loss, steps=steps, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, seed=seed, desc="classifier KD", progress=progress)  # fmt: skip


def _rows(teacher: torch.Tensor | SparseTargets, idx: torch.Tensor) -> torch.Tensor | SparseTargets:
    return teacher.rows(idx) if isinstance(teacher, SparseTargets) else teacher[idx]
