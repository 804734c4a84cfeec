"""The fused loss's planned gradient by autograd (before) and in closed form (after), at the demo's shapes.

One KD step of the full demo: 8 x 128 tokens (1,016 scored rows), H = 640, the student's 17,031-id head and the
teacher's head over the same ids in bfloat16, under the bf16 autocast the Trainer uses, fkl at T = 1, alpha 0.5
(`fused_kd_terms` with `loss_weights`, then `backward`); and the CE step (no teacher). Random weights: only the
shapes matter for the time. Before: each chunk's gradient by autograd through `losses.fused._chunk_sums` (a
log-softmax for the CE, another for the divergence, the CE's backward, the sum of the two gradients; the code
`_closed_form` replaced, reproduced below); after: `_closed_form`. Arms alternate; each figure is the minimum CPU
time of `--reps` (this process, one thread), with the largest relative difference of the gradients.

    python benchmarks/fused_closed_form.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from potstill.losses import Divergence, fused, kd_weights
from potstill.losses.fused import TeacherHead, fused_kd_terms

ROWS, H, V = 1016, 640, 17031


def closed_form_before(z, teacher, labels, div, weights):
    """The replaced code: the chunk's planned gradient by autograd through `_chunk_sums` (what `fused._run` still
    does with a softcap or sparse targets); `demo_step.py` times it too."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        kd, ce = fused._chunk_sums(fused._upcast(leaf), teacher, labels, div)
        total = ce * weights[1] + (0.0 if kd is None else kd * weights[0])
        (grad,) = torch.autograd.grad(total, leaf)
    return None if kd is None else kd.detach(), ce.detach(), grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_()
    teacher = TeacherHead(
        hidden=torch.randn(ROWS, H, generator=g).bfloat16(),
        weight=(torch.randn(V, H, generator=g) * H**-0.5).bfloat16(),
    )
    labels = torch.randint(0, V, (ROWS,), generator=g)
    weights = kd_weights(0.5, 1.0)

    def step(with_teacher: bool) -> tuple[float, list[torch.Tensor]]:
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = fused_kd_terms(
                hidden, weight, teacher if with_teacher else None, labels, Divergence("fkl"), loss_weights=weights
            )
            loss = weights[1] * terms.ce + (weights[0] * terms.kd if with_teacher else 0.0)
        loss.backward()
        seconds = time.process_time() - start
        grads = [hidden.grad, weight.grad]
        hidden.grad = weight.grad = None
        return seconds, grads

    after, result, grads = fused._closed_form, {}, {}
    for arm, closed_form in (("before", closed_form_before), ("after", after)) * args.reps:
        fused._closed_form = closed_form
        for name, with_teacher in (("kd", True), ("ce", False)):
            seconds, grads[name, arm] = step(with_teacher)
            key = f"{name}_loss_cpu_s_{arm}"
            result[key] = min(result.get(key, float("inf")), seconds)
    fused._closed_form = after
    for name in ("kd", "ce"):
        result[f"{name}_ratio_before_over_after"] = (
            result[f"{name}_loss_cpu_s_before"] / result[f"{name}_loss_cpu_s_after"]
        )
        result[f"{name}_max_rel_grad_diff"] = max(
            float((a - b).norm() / b.norm()) for a, b in zip(grads[name, "after"], grads[name, "before"], strict=True)
        )
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
