"""Measure what `potstill plan` estimates: a real `run_distill` in a fresh process, its peak RSS and step times.

`measure_run(cfg)` runs `python -m potstill.plan.measure` with the config on stdin; that process trains with a
`StepClock` callback noting when each optimizer step ends and prints `[peak RSS, wall seconds, step seconds]`.
Used to check the plan (tests/plan/test_plan.py, benchmarks/bench_plan.py); it really trains.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

from potstill.config import DistillConfig


class Measured(NamedTuple):
    """What `measure_run` saw: peak RSS (bytes), wall seconds (loading included), and the seconds of optimizer steps
    2, 3, ... (each from the end of the previous step to its own end; step 1 holds the warm-up)."""

    peak: int
    seconds: float
    steps: list[float]

    def step_seconds(self, cfg: DistillConfig) -> tuple[float, float]:
        """(median seconds of the steps 2.. that do not log, the last step's extra over it) of a run of `cfg`.

        Every `train.logging_steps`-th step and the last one log (and take the gradient-ratio passes).
        """
        last, every = cfg.train.max_steps, cfg.train.logging_steps
        plain = statistics.median(s for step, s in enumerate(self.steps, start=2) if step % every and step != last)
        return plain, self.steps[-1] - plain


def measure_run(cfg: DistillConfig, timeout: float = 600) -> Measured:
    """Peak RSS, wall time and step times of `run_distill(cfg)` in a fresh subprocess (what the plan estimates).

    It really trains. Logging steps
    (every `train.logging_steps` and the last) take the gradient-ratio passes on top of a plain step. The peak is
    the process's own high-water mark (`VmHWM`, Linux): `ru_maxrss` keeps the parent's peak across fork + exec.
    """
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "potstill.plan.measure"]
    proc = subprocess.run(
        command, input=cfg.model_dump_json(), capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run_distill failed:\n{proc.stderr[-2000:]}")
    return Measured(*json.loads(proc.stdout.splitlines()[-1]))


def main() -> None:
    """Train the config read (as JSON) from stdin and print `[peak RSS bytes, wall seconds, [step seconds]]`."""
    from transformers import TrainerCallback

    from potstill.train.recipes import run_distill

    class StepClock(TrainerCallback):
        """Notes when each optimizer step ends."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    start = time.perf_counter()
    run_distill(DistillConfig.model_validate_json(sys.stdin.read()), callbacks=[clock])
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    peak = int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    print(json.dumps([peak, time.perf_counter() - start, steps]))


if __name__ == "__main__":
    main()
