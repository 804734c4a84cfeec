"""`potstill plan` against reality: the plan's peak-memory total vs the peak RSS of 2 steps of `run_distill`.

Each case runs `run_distill` for `--steps` optimizer steps in a fresh subprocess (`potstill.plan.measure_run`,
peak RSS from `ru_maxrss`) and prints the plan's total (online teacher; cached when loss.alpha = 0) beside it.

Run: `python benchmarks/bench_plan.py` (random tiny models built in a temp dir: a runtime-dominated case and
V = 32,768 cases where the loss buffers dominate; ~1 min), or a real pair:
`python benchmarks/bench_plan.py --student DIR --teacher DIR --data train.jsonl data.seq_len=128 train.batch_size=8`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument(
        "--time-steps", type=int, default=0, help="also run steps + N steps: step time = extra seconds / N"
    )
    parser.add_argument("overrides", nargs="*", help="key=value, as for potstill distill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.student:
            cases, data = [("given", args.student, args.teacher, args.overrides)], args.data
        else:
            cases, data = tiny_pairs(root), root / "train.jsonl"
            data.write_text("".join(json.dumps({"text": "the cat sat on a mat " * 20}) + "\n" for _ in range(200)))
        print("| case | plan MiB | measured MiB | plan / measured | biggest parts (MiB) | s | plan s/step | s/step |")
        print("|---|---:|---:|---:|---|---:|---:|---:|")
        for name, student, teacher, overrides in cases:
            cfg = load_config(None, [f"model.student={student}", f"model.teacher={teacher}", f"data.train=[{data}]",
                                     f"train.max_steps={args.steps}", f"train.output_dir={root / 'run'}",
                                     "train.overwrite=true", *overrides])  # fmt: skip
            plan = plan_config(cfg, probe=args.time_steps > 0)
            start = time.perf_counter()
            peak, seconds = measure_run(cfg)
            total = plan.online_total or plan.cache_total
            parts = ", ".join(f"{k} {v // MIB}" for k, v in sorted(plan.memory.items(), key=lambda kv: -kv[1])[:4])
            step, planned = "-", "-"
            if args.time_steps:
                longer = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"max_steps": args.steps + args.time_steps})}
                )
                step = f"{(measure_run(longer)[1] - seconds) / args.time_steps:.2f}"
                planned = (
                    f"{plan.step_seconds['online' if plan.online_total else 'cache']:.2f} ({plan.gflops:.0f} GFLOP/s)"
                )
            print(f"| {name} | {total // MIB} | {peak // MIB} | {total / peak:.2f} | {parts} |"
                  f" {time.perf_counter() - start:.0f} | {planned} | {step} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
