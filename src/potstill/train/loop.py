"""The small in-memory training loop shared by the vision paths (classifier, embedding and captioning KD).

Those three train a module on tensors already in memory, so they need none of `DistillTrainer`'s machinery (run
directory, accumulation, resume): `fit_loop` is AdamW on seeded shuffled mini-batches (a new permutation of the N
items each time the remaining items do not fill a batch), an optional linear decay of the learning rate to 0, and
the loss of every step. The caller says what one batch costs: `batch_loss(idx [b] long) -> scalar loss`.
Seeded: the same seed gives the same batches and, on a CPU, the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from potstill.errors import UserError


def fit_loop(
    params: Iterable[torch.nn.Parameter],
    items: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    decay: bool = False,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """`steps` AdamW steps over `items` items in seeded shuffled batches of `batch_size` indices.

    Args:
        params: the parameters to update (those with requires_grad are kept).
        items: N, the number of training items; batches are index tensors into them.
        batch_loss: idx [b] -> the scalar loss of those items (forward only: the loop does backward and the step).
        steps: optimizer steps.
        batch_size: items per step (all N when N is smaller).
        lr: AdamW learning rate (the peak when `decay`).
        weight_decay: AdamW weight decay.
        decay: decay the learning rate linearly to 0 over `steps`.
        seed: seed of the batch order.
        desc: progress-bar label.
        progress: show a progress bar.

    Returns:
        The loss of each step.

    Raises:
        UserError: no trainable parameter, no item, or a batch size below 1.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError(f"{desc}: the model has no trainable parameter")
    if items < 1 or batch_size < 1:
        raise UserError(f"{desc}: no training item or a batch size below 1 ({items} items, batch size {batch_size})")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps) if decay else None
    generator = torch.Generator().manual_seed(seed)
    order, pos, history = torch.randperm(items, generator=generator), 0, []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        if pos + batch_size > items:
            order, pos = torch.randperm(items, generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = batch_loss(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        history.append(loss.item())
    return history
