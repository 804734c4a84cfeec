"""Embedding distillation loop: a student maps inputs to the teacher's embedding space (cross-modal: images to
where a text teacher embeds their captions), with a loss of `potstill.losses.embedding` (cosine, mse, contrastive).
The loop is `potstill.train.loop.fit_loop`; seeded: the same seed gives the same batches and the same result.
"""

from __future__ import annotations

import torch
from torch import nn

from potstill.errors import UserError
from potstill.losses.embedding import embedding_loss
from potstill.train.loop import fit_loop


def fit_embedder(
    student: nn.Module,
    inputs: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    tau: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `student` for `steps` AdamW steps on shuffled mini-batches (a new permutation each epoch).

    Args:
        student: maps inputs [b, ...] to vectors [b, D].
        inputs: [N, ...] training inputs (e.g. frozen image features).
        teacher: [N, D] teacher embeddings of each item's text.
        kind: "cosine", "mse" or "contrastive" (in-batch negatives: a larger batch gives more of them).
        steps: optimizer steps.
        batch_size: items per step.
        lr: AdamW learning rate.
        tau: contrastive temperature.
        seed: seed of the batch order.
        progress: show a progress bar.

    Returns:
        The loss of each step.
    """
    if len(inputs) != len(teacher):
        raise UserError(f"embedding KD: {len(inputs)} inputs but {len(teacher)} teacher embeddings")

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return embedding_loss(student(inputs[idx]), teacher[idx], kind, tau)

    return fit_loop(student.parameters(), len(inputs), batch_loss, steps=steps, batch_size=batch_size, lr=lr,
                    weight_decay=0.01, seed=seed, desc=f"embedding KD ({kind})", progress=progress)  # fmt: skip
