"""Classifier distillation: the whole loop on one screen, on inputs already in memory.

`fit_classifier` trains the student's trainable parameters with the KD objective of `potstill.losses.classifier`
(alpha * T^2 * D + (1 - alpha) * CE, weights from `combine`), seeded: the same seed gives the same batches and the
same result. Inputs are tensors (pixels, or the outputs of a frozen front of the student computed once), teacher
targets come from an image teacher cache (sparse) or from teacher logits (dense).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from potstill.errors import UserError
from potstill.losses import Divergence, combine
from potstill.losses.classifier import classifier_kd_terms
from potstill.losses.sparse import SparseTargets


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
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError("classifier KD: the student has no trainable parameter")
    n = len(inputs)
    if len(labels) != n:
        raise UserError(f"classifier KD: {n} inputs but {len(labels)} labels")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order, pos, history = torch.randperm(n, generator=generator), 0, []
    for _ in tqdm(range(steps), desc="classifier KD", disable=not progress):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        targets = None if teacher is None or alpha == 0 else _rows(teacher, idx)
        terms = classifier_kd_terms(student(inputs[idx]), targets, labels[idx], div)
        loss = combine(terms, alpha, div.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def _rows(teacher: torch.Tensor | SparseTargets, idx: torch.Tensor) -> torch.Tensor | SparseTargets:
    return teacher.rows(idx) if isinstance(teacher, SparseTargets) else teacher[idx]
