"""Benchmark the loss zoo: potstill's divergences vs naive PyTorch and TRL, forward + backward.

For each divergence, the same random float32 logits (N tokens x V) go through three implementations:
potstill (`potstill.losses.divergences`), a naive version written the way a user would (softmax, then
log of probabilities), and TRL's `GKDTrainer.generalized_jsd_loss` where TRL has the divergence (jsd,
whose beta = 0 / 1 are TRL's fkl / rkl). Each case runs `D(student, teacher).sum().backward()`.

Time: median wall time of `--repeats` runs after one warm-up run.
Peak memory: the warm-up run's peak resident memory above the memory held before it (inputs included
in neither). Linux only: the kernel's RSS high-water mark (VmHWM) is reset through
/proc/self/clear_refs before each case, then read back; torch's CPU allocator returns large blocks to
the OS on free (glibc's mmap threshold is pinned at 64 KiB here so that this also holds for small
sizes), so cases do not leak into each other. This counts every byte the case touches
(autograd's saved tensors, temporaries, the gradient), unlike tracemalloc, which does not see torch.

Run: python benchmarks/bench_losses.py [--quick] [--tokens N] [--vocab V [V ...]] [--repeats R]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from potstill.losses import divergences

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CASES: list[tuple[str, dict]] = [
    ("fkl", {}),
    ("rkl", {}),
    ("tvd", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skl", {"skew": 0.1}),
    ("srkl", {"skew": 0.1}),
    ("akl", {"mu": 0.5}),
]


# ---- naive implementations: probabilities first, then logs of them -----------------------------------


def _naive_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def naive(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, **kw: float) -> torch.Tensor:
    """The textbook formula on probabilities (NaN when a probability underflows; fine on these inputs)."""
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    if name == "fkl" or (name == "jsd" and kw["beta"] == 0.0):
        return _naive_kl(p, q)
    if name == "rkl" or (name == "jsd" and kw["beta"] == 1.0):
        return _naive_kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        m = kw["beta"] * p + (1 - kw["beta"]) * q
        return kw["beta"] * _naive_kl(p, m) + (1 - kw["beta"]) * _naive_kl(q, m)
    if name == "skl":
        return _naive_kl(p, kw["skew"] * p + (1 - kw["skew"]) * q)
    if name == "srkl":
        return _naive_kl(q, (1 - kw["skew"]) * p + kw["skew"] * q)
    # akl as in DSKD's code: sort the teacher, tail = ascending cumulative mass < mu.
    sorted_p, idx = p.sort(-1)
    gap = (sorted_p - q.gather(-1, idx)).abs()
    tail = (sorted_p.cumsum(-1) < kw["mu"]).float()
    g_head, g_tail = (gap * (1 - tail)).sum(-1).detach(), (gap * tail).sum(-1).detach()
    return (g_head * _naive_kl(p, q) + g_tail * _naive_kl(q, p)) / (g_head + g_tail)


def implementations(name: str, kw: dict, temperature: float) -> dict[str, Divergence]:
    """The implementations that exist for one case: potstill, naive, and TRL for jsd."""
    impls: dict[str, Divergence] = {
        "potstill": lambda s, t: getattr(divergences, name)(s, t, temperature, **kw),
        "naive": lambda s, t: naive(name, s, t, temperature, **kw),
    }
    if name == "jsd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        # reduction="none" is [N, V]; TRL's own reductions only divide the same sum differently.
        impls["trl"] = lambda s, t: GKDTrainer.generalized_jsd_loss(
            s, t, beta=kw["beta"], temperature=temperature, reduction="none"
        ).sum(-1)
    return impls


# ---- measurement ------------------------------------------------------------------------------------


def _release_freed_memory_to_os() -> None:
    """Serve every allocation >= 64 KiB with its own mmap, so a free returns it to the OS at once."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_threshold = -3  # from malloc.h; setting it also turns off glibc's dynamic threshold
    libc.mallopt(m_mmap_threshold, 64 * 1024)


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _step(fn: Divergence, s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = None
    fn(s, t).sum().backward()


def measure(fn: Divergence, s: torch.Tensor, t: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB above the pre-case resident memory) of forward + backward."""
    s.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
    before = _status_kib("VmRSS")
    _step(fn, s, t)
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(fn, s, t)
        times.append(time.perf_counter() - start)
    s.grad = None
    return statistics.median(times), peak_mib


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def run(tokens: int, vocab: int, repeats: int, temperature: float) -> list[str]:
    """Markdown table rows for every case at one size."""
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(tokens, vocab, generator=gen) * 2).requires_grad_(True)
    t = torch.randn(tokens, vocab, generator=gen) * 2
    rows = []
    for name, kw in CASES:
        label = name + "".join(f" {k}={v}" for k, v in kw.items())
        res = {impl: measure(fn, s, t, repeats) for impl, fn in implementations(name, kw, temperature).items()}
        ms = {k: v[0] * 1e3 for k, v in res.items()}
        mib = {k: v[1] for k, v in res.items()}
        cells = [label]
        cells += [f"{ms[k]:.0f}" if k in ms else "-" for k in ("potstill", "naive", "trl")]
        cells += [_ratio(ms["potstill"], ms["naive"]), _ratio(ms["potstill"], ms.get("trl"))]
        cells += [f"{mib[k]:.0f}" if k in mib else "-" for k in ("potstill", "naive", "trl")]
        cells += [_ratio(mib["potstill"], mib["naive"]), _ratio(mib["potstill"], mib.get("trl"))]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


HEADER = (
    "| loss | potstill ms | naive ms | TRL ms | time pot/naive | time pot/TRL "
    "| potstill MiB | naive MiB | TRL MiB | mem pot/naive | mem pot/TRL |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens x 8k vocab, 2 repeats (a smoke run)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    _release_freed_memory_to_os()
    if args.quick:
        args.tokens, args.vocab, args.repeats = 512, [8192], 2
    print(
        f"# {date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"float32, T={args.temperature}, forward+backward of D(student, teacher).sum(), median of {args.repeats}"
    )
    for vocab in args.vocab:
        print(f"\nN = {args.tokens} tokens x V = {vocab}\n\n{HEADER}", flush=True)
        run(args.tokens, vocab, args.repeats, args.temperature)


if __name__ == "__main__":
    main()
