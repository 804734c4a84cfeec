"""Where the seconds of one `potstill demo` training step go: the KD step and the CE step, part by part.

Loads the full demo's KD arm exactly as `potstill distill` would (demo.yaml `full`, the student_init and corpus of a
finished demo directory, the teacher in bfloat16) and times, on one [8, 128] batch, under the bf16 autocast the
Trainer uses: the teacher's forward (final hidden states over the student's 17k ids), the student's forward with the
fused head + loss (KD + CE, gradients computed in the forward), the backward through the student, and the fused
AdamW step + gradient clipping. The CE step is the same without the teacher. Each part is the minimum of `--reps`
runs (the machine is shared). Side by side in the same process: the loss's division by T at T = 1 (one [chunk, V]
float32 pass per log-softmax, removed in `losses.divergences._tempered`). The teacher's forward is also what the
demo's eval now saves per held-out batch of 8 x 128 (it runs the teacher twice, not three times:
`eval.metrics.evaluate_models`).

Side by side, interleaved, CPU seconds (min of `--reps`): the forward of the KD and the CE step with the fused loss's
planned gradient computed by autograd through `losses.fused._chunk_sums` (before: a log-softmax for the CE and another
for the divergence, the CE's backward, the sum of the two gradients) and in closed form (after:
`losses.fused._closed_form`, one log-softmax shared at T = 1), with the largest relative difference of the loss.

    python benchmarks/demo_step.py --demo /work/demo_out --teacher TEACHER_DIR [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from fused_closed_form import closed_form_before

from potstill.data import collate
from potstill.demo import arm_config, load_demo_settings
from potstill.losses import combine, fused
from potstill.train.setup import load_data, load_models
from potstill.train.step import kd_micro_step


def best(fn, reps: int) -> float:
    """Minimum wall time of `reps` calls (seconds)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = arm_config(load_demo_settings(quick=False), "kd", args.demo, args.teacher)
    models = load_models(cfg)
    train, _ = load_data(cfg, models.tokenizer)
    batch = collate([train[i] for i in range(cfg.train.batch_size)])
    student, teacher, alpha, temp = models.student.train(), models.teacher, cfg.loss.alpha, cfg.loss.temperature
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=True)  # the Trainer's default optimizer
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def teacher_fwd():
        with autocast():
            teacher.head_inputs(batch["input_ids"], batch["attention_mask"])

    def forward(kd: bool):
        with autocast():
            terms, _ = kd_micro_step(
                student, student, batch, teacher if kd else None, cfg.loss, alpha if kd else 0.0, None
            )
        return combine(terms, alpha if kd else 0.0, temp)

    def backward(kd: bool):
        loss = forward(kd)
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    def optimizer():
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        opt.step()

    result: dict = {"threads": args.threads, "batch": list(batch["input_ids"].shape)}
    result["teacher_forward_s"] = best(teacher_fwd, args.reps)
    for arm, kd in (("kd", True), ("ce", False)):
        result[f"{arm}_forward_s"] = best(lambda kd=kd: forward(kd), args.reps)  # noqa: B023
        result[f"{arm}_backward_s"] = min(backward(kd) for _ in range(args.reps))
        result[f"{arm}_optimizer_s"] = best(optimizer, args.reps)
        opt.zero_grad()
        result[f"{arm}_step_s"] = (
            result[f"{arm}_forward_s"] + result[f"{arm}_backward_s"] + result[f"{arm}_optimizer_s"]
        )

    def timed_forward(kd: bool) -> tuple[float, float]:
        """(CPU seconds, loss) of one forward."""
        start = time.process_time()
        loss = forward(kd).item()
        return time.process_time() - start, loss

    after, losses = fused._closed_form, {}
    for arm, closed_form in (("before", closed_form_before), ("after", after)) * args.reps:
        fused._closed_form = closed_form
        for step, kd in (("kd", True), ("ce", False)):
            key = f"{step}_forward_cpu_s_{arm}"
            seconds, losses[step, arm] = timed_forward(kd)
            result[key] = min(result.get(key, float("inf")), seconds)
    fused._closed_form = after
    for step in ("kd", "ce"):
        before_s, after_s = result[f"{step}_forward_cpu_s_before"], result[f"{step}_forward_cpu_s_after"]
        result[f"{step}_forward_cpu_ratio"] = before_s / after_s
        result[f"{step}_loss_rel_diff"] = abs(losses[step, "after"] / losses[step, "before"] - 1)
    rows, vocab = batch["input_ids"].numel() - batch["input_ids"].shape[0], student.config.vocab_size
    z = torch.randn(rows // 2 + 1, vocab)  # the fused loss's chunk: ~985 rows at V = 17,031 (two per step)
    result["log_softmax_s"] = best(lambda: torch.log_softmax(z, -1), args.reps)
    result["log_softmax_div_by_1_s"] = best(lambda: torch.log_softmax(z / 1.0, -1), args.reps)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
