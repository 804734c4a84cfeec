"""Recipe arms of `potstill demo` on a shortened budget: one training arm per call, scored on the held-out split.

Each call trains one arm of the full demo's `distill` settings (demo.yaml `full`) from an existing demo directory's
corpus and pruned student (`--demo DIR`: a finished `potstill demo` run; its `student_init/` and `corpus/` are read,
nothing in it is written), with dotted overrides (`--set train.lr=6e-4 hidden.weight=3`), for `--steps` optimizer
steps, then scores the student on `corpus/heldout.jsonl` (bits per byte, overall and per domain; no teacher) and
appends one JSON line to `--results`. Arms compared in one table share the corpus, the student init, the data
order (train.seed) and the step budget; `--arm ce` is the CE-only arm (alpha 0, no teacher).

    python benchmarks/demo_recipe.py --demo /work/demo_out --out RUNS/kd120 --steps 120 --arm kd
    python benchmarks/demo_recipe.py --demo /work/demo_out --out RUNS/kdh3 --steps 120 --arm kd --set hidden.weight=3
    python benchmarks/demo_recipe.py --demo /work/demo_out --out RUNS/ce120 --steps 120 --arm ce

Threads: `torch.set_num_threads(--threads)` (default 1: the shared machine's rule). Wall time and CPU seconds of the
training are in the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from potstill.config import apply_overrides, validate_config
from potstill.data import load_dataset
from potstill.demo import arm_config, load_demo_settings
from potstill.eval.metrics import evaluate
from potstill.models.load import load_model
from potstill.train.recipes import run_distill


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished full demo directory (corpus, student_init)")
    ap.add_argument("--teacher", type=Path, required=True, help="the teacher's HF directory")
    ap.add_argument("--out", type=Path, required=True, help="this arm's run directory")
    ap.add_argument("--arm", choices=("kd", "ce"), default="kd")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--set", nargs="*", default=[], help="dotted overrides of the arm's distill config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=None, help="JSONL file the result line is appended to")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = arm_config(load_demo_settings(quick=False), args.arm, args.demo, args.teacher)
    raw = cfg.model_dump(mode="json")
    raw["train"].update({"output_dir": str(args.out), "max_steps": args.steps, "save_steps": 0})
    apply_overrides(raw, args.set)
    cfg = validate_config(raw)
    start, cpu = time.perf_counter(), cpu_seconds()
    run_distill(cfg)
    train_s, train_cpu = time.perf_counter() - start, cpu_seconds() - cpu

    model, tok = load_model(args.out / "student")
    heldout = load_dataset([args.demo / "corpus" / "heldout.jsonl"], tok, cfg.data.seq_len)
    metrics = evaluate(model, heldout, batch_size=8, progress=False)
    row = {
        "arm": args.arm,
        "set": args.set,
        "steps": args.steps,
        "seed": cfg.train.seed,
        "bpb": round(metrics["overall"]["bpb"], 4),
        "domains": {d: round(m["bpb"], 4) for d, m in sorted(metrics["domains"].items())},
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu, 1),
        "threads": args.threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(row))
    if args.results:
        with args.results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
