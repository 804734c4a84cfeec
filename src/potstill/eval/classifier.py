"""Evaluate a classifier student against its teacher: top-1 agreement, top-5 overlap, KL, per domain; latency.

Every metric is a mean over items, pooled per domain and overall (a domain weighs by its item count):

- `top1_agreement`: fraction of items where argmax q_student == the teacher's top-1;
- `top5_overlap`: |top-5 of the student ∩ top-5 of the teacher| / 5;
- `kl_to_teacher`: KL(p_teacher || q_student) at T = 1 (`potstill.losses` fkl; with sparse targets the bucket
  view, exact when the cache keeps every class, a lower bound otherwise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from potstill.errors import UserError
from potstill.losses import Divergence, per_token_divergence
from potstill.losses.sparse import SparseTargets, sparse_divergence


def agreement(
    student_logits: torch.Tensor, teacher: torch.Tensor | SparseTargets, domains: Sequence[str] | None = None
) -> dict:
    """Teacher-relative metrics of [N, C] student logits.

    Args:
        student_logits: [N, C].
        teacher: [N, C] teacher logits, or SparseTargets [N, k >= 5] at temperature 1.
        domains: N domain names (per-domain figures), or None.

    Returns:
        {"overall": {"items", "top1_agreement", "top5_overlap", "kl_to_teacher"}, "domains": {name: same keys}}.
    """
    div = Divergence("fkl", temperature=1.0, sparse_tail="bucket")
    s = student_logits.float()
    if isinstance(teacher, SparseTargets):
        if teacher.k < 5:
            raise UserError(f"classifier eval: top-5 overlap needs teacher targets with k >= 5 (got k={teacher.k})")
        top5_t, kl = teacher.ids[:, :5], sparse_divergence(s, teacher, div)
    else:
        top5_t, kl = teacher.topk(5, dim=-1).indices, per_token_divergence(s, teacher.float(), div)
    top5_s = s.topk(5, dim=-1).indices
    per_item = {
        "top1_agreement": (top5_s[:, 0] == top5_t[:, 0]).double(),
        "top5_overlap": (top5_s[:, :, None] == top5_t[:, None, :]).any(-1).double().sum(-1) / 5,
        "kl_to_teacher": kl.double(),
    }
    summarize = lambda m: {"items": int(m.sum()), **{k: float(v[m].mean()) for k, v in per_item.items()}}  # noqa: E731
    by_domain = {d: torch.tensor([x == d for x in domains]) for d in sorted(set(domains or ()))}
    overall = summarize(torch.ones(len(s), dtype=torch.bool))
    return {"overall": overall, "domains": {d: summarize(m) for d, m in by_domain.items()}}


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[N, ...] inputs -> [N, C] float32 logits, in batches (the model's mode is left as it is)."""
    return torch.cat([model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])


@torch.inference_mode()
def ms_per_image(models: dict[str, tuple[nn.Module, torch.Tensor]], rounds: int = 5) -> dict[str, float]:
    """Median milliseconds per image of each model on its own batch, the models interleaved round by round.

    Interleaving puts every model under the same background load (a shared machine), so ratios are fair.

    Args:
        models: name -> (model in eval mode, [B, ...] input batch).
        rounds: timed rounds after one warm-up round.

    Returns:
        name -> median ms per image.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, (model, batch) in models.items():
            start = time.perf_counter()
            model(batch)
            if r:
                times[name].append((time.perf_counter() - start) * 1000 / len(batch))
    return {name: statistics.median(t) for name, t in times.items()}
