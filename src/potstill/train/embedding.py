"""Embedding distillation loop: a student maps inputs to the teacher's embedding space (cross-modal: images to
where a text teacher embeds their captions), with a loss of `potstill.losses.embedding` (cosine, mse, contrastive).
Seeded: the same seed gives the same batches and the same result.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from potstill.errors import UserError
from potstill.losses.embedding import embedding_loss


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
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order, pos, history = torch.randperm(len(inputs), generator=generator), 0, []
    for _ in tqdm(range(steps), desc=f"embedding KD ({kind})", disable=not progress):
        if pos + batch_size > len(inputs):
            order, pos = torch.randperm(len(inputs), generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = embedding_loss(student(inputs[idx]), teacher[idx], kind, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history
