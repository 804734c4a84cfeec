"""TED's first stage (`hidden.filters.steps > 0`): task-aware filters on the frozen teacher's mapped layers.

For each mapped teacher layer t, one `TaskFilter` g_t (g(h) = A LN(h) + b, [H_t] -> [H_t]) is trained with the
teacher frozen, on the causal LM's task: the filter's output read by the teacher's own head as next-token
cross-entropy over the scored positions,

    L_1 = (1 / n_layers) sum_t CE(softcap(W g_t(h_t)), y)

(W: the teacher's head over the student's ids, softcap: its final logit softcap). `hidden.filters.steps` AdamW
steps at `hidden.filters.lr`, each on `train.batch_size` rows of the training data drawn with `train.seed`, so a
resumed run retrains the same filters bit for bit (tested). The filters are then frozen; the second stage (the
distillation run) matches the student's filters to them (`potstill.train.hidden`). Liang et al. 2023 train a new
task head per filter; here the frozen LM head is that head (a new [V, H] head per layer would dwarf the filters).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from potstill.config import DistillConfig
from potstill.data import collate
from potstill.errors import UserError
from potstill.losses import Divergence
from potstill.losses.fused import fused_kd_terms
from potstill.losses.hidden import TaskFilter
from potstill.teacher.online import OnlineTeacher

log = logging.getLogger(__name__)


def filter_ce(filters: nn.ModuleList, states: Sequence[torch.Tensor], labels: torch.Tensor, head, chunk=None):
    """L_1 of one batch: the mean over filters of the next-token CE of the head reading each filter's output.

    Args:
        filters: one `TaskFilter` per state.
        states: [B, T, H] teacher layer outputs, one per filter.
        labels: [B, T] unshifted labels (-100 = not scored).
        head: (weight [V, H], softcap) of the teacher over the student's ids.
        chunk: rows per chunk of the fused CE.

    Returns:
        Scalar: mean over filters of (sum over scored positions of CE) / scored positions.
    """
    weight, softcap = head
    target = labels[:, 1:].reshape(-1)
    total = 0.0  # CE only (no teacher targets): the Divergence is unused
    for f, h in zip(filters, states, strict=True):
        out = f(h[:, :-1]).reshape(-1, weight.shape[-1])
        total = total + fused_kd_terms(out, weight, None, target, Divergence(), chunk_size=chunk, softcap=softcap).ce
    return total / len(filters)


def train_teacher_filters(
    cfg: DistillConfig, teacher: OnlineTeacher, train_ds, layers: Sequence[int], progress: bool = True
) -> tuple[nn.ModuleList, list[float]]:
    """Stage 1: train one filter per teacher layer in `layers` (frozen teacher), then freeze them.

    Returns:
        (the frozen filters, float32 on the teacher's device; L_1 of every step).

    Raises:
        UserError: a teacher head with a bias (the fused CE reads a bias-free head).
    """
    weight, bias, softcap = teacher.head()
    if bias is not None:
        raise UserError("hidden.filters: the teacher's output head has a bias; task-aware filters need a bias-free one")
    width = weight.shape[-1]
    device = weight.device
    filters = nn.ModuleList(TaskFilter(width, width) for _ in layers).to(device)
    head = (weight.float(), softcap)
    steps, rows = cfg.hidden.filters.steps, cfg.train.batch_size
    opt = torch.optim.AdamW(filters.parameters(), lr=cfg.hidden.filters.lr)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    losses = []
    for _ in tqdm(range(steps), desc="hidden.filters: stage 1", disable=not progress):
        batch = collate([train_ds[i] for i in torch.randint(len(train_ds), (rows,), generator=gen).tolist()])
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        _, states = teacher.with_layers(batch["input_ids"], batch.get("attention_mask"), fused=True, layers=layers)
        loss = filter_ce(filters, states, batch["labels"], head, cfg.loss.chunk_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    log.info("hidden.filters: stage-1 CE %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
    return filters.eval().requires_grad_(False), losses
