"""Cost of a KD step with several teachers (`model.teachers`) against one teacher, side by side in one process.

One micro-step (`potstill.train.step.kd_micro_step`: teacher forwards, student forward, loss, backward) on the same
batch of packed rows, arms interleaved round by round so background load hits them alike; median of the rounds:

- `one_a`, `one_b`: each teacher alone on every row;
- `routed`: the two teachers, each on its half of the rows (per-domain routing): ideally the mean of one_a and one_b;
- `summed`: both teachers on every row (weights 0.5 / 0.5): ideally one_a + one_b minus one student forward/backward.

    python benchmarks/bench_teachers_step.py --student S --teachers T1 T2 --data train.jsonl [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from potstill.config import LossConfig
from potstill.data import collate, load_dataset
from potstill.losses import combine
from potstill.models.load import load_model
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.several import TeacherSet
from potstill.train.step import kd_micro_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teachers", nargs=2, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    student, tok = load_model(args.student)
    student.train()
    a, b = (OnlineTeacher(load_model(p)[0]) for p in args.teachers)
    ds = load_dataset([args.data], tok, args.seq_len, True)
    batch = collate([ds[i] for i in range(args.batch_size)])
    half = args.batch_size // 2
    batch["domain"] = ["x"] * half + ["y"] * (args.batch_size - half)
    n = int((batch["labels"][:, 1:] != -100).sum())
    arms = {
        "one_a": a,
        "one_b": b,
        "routed": TeacherSet([a, b], ["a", "b"], [1.0, 1.0], [["x"], ["y"]]),
        "summed": TeacherSet([a, b], ["a", "b"], [1.0, 1.0], [None, None]),
    }
    loss = LossConfig(name="fkl", alpha=0.5)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, teacher in arms.items():
            student.zero_grad(set_to_none=True)
            began = time.perf_counter()
            terms, _ = kd_micro_step(student, student, batch, teacher, loss, 0.5, n)
            combine(terms, 0.5, 1.0).backward()
            times[name].append(time.perf_counter() - began)
    med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    mean_one = (med["one_a"] + med["one_b"]) / 2
    for name, ts in times.items():
        rounds = [round(1000 * t) for t in ts[1:]]
        print(f"{name:<7} {1000 * med[name]:8.1f} ms  {med[name] / mean_one:5.2f}x the mean one-teacher step  {rounds}")


if __name__ == "__main__":
    main()
