"""FSDP and DeepSpeed through `potstill distill` on GPUs: the same losses and final weights as one process.

accelerate runs FSDP and DeepSpeed only on GPUs (potstill refuses them on CPUs, docs/distributed.md), so this is
the check to run on a machine with 2 or more CUDA GPUs. It builds the test suite's tiny student and teacher (a
Llama of hidden 32 and one of hidden 64, 300 tokens), runs the one-process reference with `train.grad_accum=2`,
then each engine under `accelerate launch --config_file potstill/configs/accelerate/ENGINE.yaml --num_processes 2`
with `grad_accum=1` (the same global batch), and compares:

- every logged step's loss, kd, ce and grad_norm: the largest relative difference;
- the final student (`student/model.safetensors`, gathered on save): the largest absolute difference;
- `summary.json`'s engine: the type accelerate used (FSDP, DEEPSPEED; not a silent fallback to DDP).

PASS is a relative difference under 1e-4 and a weight difference under 1e-5 (float32; the sharded engines sum
gradients by reduce-scatter in another order than one process does). Engines whose package is missing (deepspeed)
are reported as skipped. Exit status: 0 all ran engines passed, 1 one failed or differed, 2 fewer than 2 GPUs.

    python benchmarks/engines_gpu.py [--steps 5] [--engines ddp fsdp deepspeed_zero2 deepspeed_zero3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
LOGGED = ("loss", "kd", "ce", "grad_norm")
RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def workspace(root: Path) -> None:
    """The tiny student / teacher pair and a 64-line corpus (the test suite's builders)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, build_tokenizer, write_corpus

    tokenizer = build_tokenizer()
    build_model(tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tokenizer, 1, hidden=64, max_positions=64, save_to=root / "teacher")
    write_corpus(root / "train.jsonl", 64)


def distill_args(root: Path, out: Path, steps: int, grad_accum: int) -> list[str]:
    return [
        "distill", f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
        f"data.train=[{root / 'train.jsonl'}]", "data.seq_len=16", f"train.output_dir={out}", "train.batch_size=2",
        f"train.grad_accum={grad_accum}", f"train.max_steps={steps}", "train.save_steps=0", "train.logging_steps=1",
        "train.lr=0.003", "train.warmup_steps=0", "loss.temperature=2.0",
    ]  # fmt: skip


def launch(args: list[str], engine: str | None) -> subprocess.CompletedProcess:
    """`potstill ARGS` alone (engine None) or under `accelerate launch` with the shipped config of `engine`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    if engine is None:
        cmd = [sys.executable, "-m", "potstill.cli", *args]
    else:
        config = Path(str(resources.files("potstill") / "configs" / "accelerate" / f"{engine}.yaml"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", "-m", "potstill.cli", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def compare(got: Path, want: Path) -> tuple[float, float, str]:
    """(largest relative difference of the logged figures, largest |weight difference|, the engine type used)."""
    from safetensors.torch import load_file

    def log(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]

    a, b = log(got), log(want)
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return float("inf"), float("inf"), "other steps logged"
    rel = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b, strict=True) for k in LOGGED if k in y)
    wa, wb = (load_file(run / "student" / "model.safetensors") for run in (got, want))
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wb) if wa.keys() == wb.keys() else 1e9
    engine = json.loads((got / "summary.json").read_text())["engine"]["type"]
    return rel, diff, engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--keep", type=Path, help="work here and keep the runs (default: a temporary directory)")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"needs 2 or more CUDA GPUs, this machine has {torch.cuda.device_count()}")
        return 2
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="potstill-engines-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        workspace(root)
        ref = root / "one-process"
        proc = launch(distill_args(root, ref, args.steps, grad_accum=2), None)
        if proc.returncode != 0:
            print(f"the one-process reference failed:\n{proc.stderr[-3000:]}")
            return 1
        failed = False
        for engine in args.engines:
            if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                print(f"{engine}: skipped (pip install deepspeed)", flush=True)
                continue
            out = root / engine
            proc = launch(distill_args(root, out, args.steps, grad_accum=1), engine)
            if proc.returncode != 0:
                failed = True
                print(f"{engine}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            rel, diff, used = compare(out, ref)
            ok = rel < RTOL and diff < WEIGHT_ATOL
            failed |= not ok
            print(f"{engine}: {'PASS' if ok else 'DIFFERS'}: engine {used}, {args.steps} steps, largest relative "
                  f"difference of {'/'.join(LOGGED)} {rel:.2e}, of the final weights {diff:.2e} (absolute)",
                  flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
