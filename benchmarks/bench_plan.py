"""`potstill plan` against reality: the plan's peak memory and s/step vs a real `run_distill` of the same config.

Each case runs `run_distill` for `--steps` optimizer steps in a fresh subprocess (`potstill.plan.measure_run`:
peak RSS from `ru_maxrss`, the end time of every optimizer step) and prints the plan's total (online teacher;
cached when loss.alpha = 0) beside it. With `--time-steps N` the run is N steps longer and the plan probes its
step time just before the run (same machine load): measured s/step = the median of steps 2.. that do not log
(logging steps add the gradient-ratio passes, planned apart as `logging_extra`).

Run: `python benchmarks/bench_plan.py --time-steps 4` (random tiny models built in a temp dir: a runtime-dominated
case and V = 32,768 cases where the loss buffers dominate; a few minutes), or a real pair:
`python benchmarks/bench_plan.py --student DIR --teacher DIR --data train.jsonl --time-steps 4 --ce
data.seq_len=128 train.batch_size=8` (`--ce`: also the same run with loss.alpha=0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from potstill.config import load_config
from potstill.plan import MIB, measure_run, plan_config


def tiny_pairs(root: Path) -> list[tuple[str, Path, Path, list[str]]]:
    """Random Llama pairs over a 300-token BPE: (name, student, teacher, overrides)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer  # noqa: PLC0415  (test helper, not a package)
    from test_plan import save_llama  # noqa: PLC0415

    tok = build_tokenizer()
    save_llama(root / "s", tok, 32, len(tok))
    save_llama(root / "t", tok, 64, len(tok), seed=1)
    save_llama(root / "S", tok, 64, 32768)
    save_llama(root / "T", tok, 128, 32768, seed=1)
    small = ["data.seq_len=64", "train.batch_size=4"]
    big = ["data.seq_len=128", "train.batch_size=4"]
    return [
        ("tiny V=300", root / "s", root / "t", small),
        ("V=32768 dense", root / "S", root / "T", [*big, "loss.fused=false"]),
        ("V=32768 fused", root / "S", root / "T", big),
        ("V=32768 fused, CE only", root / "S", root / "T", [*big, "loss.alpha=0"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=0, help="N more steps, and compare s/step with the plan")
    parser.add_argument("--ce", action="store_true", help="given pair: also run it with loss.alpha=0 (CE only)")
    parser.add_argument("--threads", type=int, help="torch threads of the probe and the run (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for potstill distill")
    args = parser.parse_args()
    if args.threads:  # the probe runs here, the measured run in a subprocess that reads OMP_NUM_THREADS
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.student:
            cases, data = [("given", args.student, args.teacher, args.overrides)], args.data
            if args.ce:
                cases.append(("given, CE only", args.student, args.teacher, [*args.overrides, "loss.alpha=0"]))
        else:
            cases, data = tiny_pairs(root), root / "train.jsonl"
            data.write_text("".join(json.dumps({"text": "the cat sat on a mat " * 20}) + "\n" for _ in range(200)))
        print("| case | plan MiB | measured MiB | plan / measured | biggest parts (MiB) | s |"
              " plan s/step (probe s) | s/step | plan / measured | logging step + s, plan / measured |")  # fmt: skip
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for name, student, teacher, overrides in cases:
            cfg = load_config(None, [
                f"model.student={student}", f"model.teacher={teacher}", f"data.train=[{data}]",
                f"train.max_steps={args.steps + args.time_steps}", f"train.output_dir={root / 'run'}",
                "train.overwrite=true", *overrides,
            ])  # fmt: skip
            start = time.perf_counter()
            plan = plan_config(cfg, probe=args.time_steps > 0)
            measured = measure_run(cfg)
            total = plan.online_total or plan.cache_total
            parts = ", ".join(f"{k} {v // MIB}" for k, v in sorted(plan.memory.items(), key=lambda kv: -kv[1])[:4])
            timing = "- | - | - | -"
            if plan.step_seconds:
                planned = plan.step_seconds["online" if plan.online_total else "cache"]
                step, extra = measured.step_seconds(cfg)
                timing = (f"{planned:.2f} ({plan.probe['seconds']:.0f}) | {step:.2f} | {planned / step:.2f} |"
                          f" {plan.step_seconds['logging_extra']:.2f} / {extra:.2f}")  # fmt: skip
            print(f"| {name} | {total // MIB} | {measured.peak // MIB} | {total / measured.peak:.2f} | {parts} |"
                  f" {time.perf_counter() - start:.0f} | {timing} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
