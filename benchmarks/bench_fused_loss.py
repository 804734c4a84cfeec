"""Dense vs fused KD loss: peak memory and forward+backward time of the loss + lm_head, float32 CPU.

Dense: student logits `h @ W.T` and teacher logits `h_t @ W_t.T` materialized ([N, V] each), `kd_terms`,
`combine`, backward. Fused: `fused_kd_terms` on the hidden states and head weights (never [N, V]),
with the loss weights planned (gradient computed during the forward) and without (backward recomputes).

Memory: each (case, method) runs in a fresh subprocess. It allocates the inputs (h, W, h_t, W_t, labels),
records its peak RSS (`ru_maxrss`), runs the method, and reports the peak RSS growth over that
baseline. The gradients of h and W are part of what the method produces and count in both. The worker
caps its address space (RLIMIT_AS) so a dense case too big for the machine fails with MemoryError
instead of waking the OOM killer.

    python benchmarks/bench_fused_loss.py            # V = 262,144 and 32,768; H = 640; 2,048 tokens
    python benchmarks/bench_fused_loss.py --quick    # < 1 min: V = 32,768, 512 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("dense", "fused", "fused-recompute")


def _inputs(vocab: int, hidden: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    # Scaled in place: a temporary [V, H] copy would raise the baseline peak and hide the method's memory.
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).mul_(hidden**-0.5).requires_grad_()
    h_t = torch.randn(tokens, hidden, generator=g)
    w_t = torch.randn(vocab, hidden, generator=g).mul_(hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[-1] = -100  # the dense path never scores the last position: same N - 1 tokens in both
    return h, w, h_t, w_t, labels


def _step(method: str, inputs, cfg, alpha: float, chunk: int | None) -> float:
    """One forward + backward; returns the loss value."""
    import torch

    from potstill.losses import combine, kd_terms
    from potstill.losses.fused import TeacherHead, fused_kd_terms

    h, w, h_t, w_t, labels = inputs
    if method == "dense":
        student = (h @ w.T).unsqueeze(0)
        with torch.no_grad():
            teacher = (h_t @ w_t.T).unsqueeze(0)
        # kd_terms shifts: logit row i predicts unshifted[i + 1] = labels[i] (the last row is never scored).
        unshifted = torch.cat([labels.new_full((1,), -100), labels[:-1]]).unsqueeze(0)
        terms = kd_terms(student, teacher, unshifted, cfg)
    else:
        weights = (alpha * cfg.temperature**2, 1 - alpha) if method == "fused" else None
        terms = fused_kd_terms(h, w, TeacherHead(h_t, w_t), labels, cfg, chunk_size=chunk, loss_weights=weights)
    loss = combine(terms, alpha, cfg.temperature)
    loss.backward()
    return loss.item()


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cap_address_space(limit_gib: float) -> None:
    with open("/proc/self/status") as f:
        vm_size_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_size_kib * 1024 + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(args: argparse.Namespace) -> None:
    """Run one method in this fresh process and print a JSON line."""
    import torch

    from potstill.config import LossConfig

    torch.manual_seed(0)
    inputs = _inputs(args.vocab, args.hidden, args.tokens)
    base = _max_rss_mib()
    _cap_address_space(args.limit_gib)
    cfg = LossConfig(name=args.loss, temperature=args.temperature)
    times, loss = [], None
    try:
        for _ in range(args.repeats):
            for t in inputs[:2]:
                t.grad = None
            start, cpu = time.perf_counter(), time.process_time()
            loss = _step(args.method, inputs, cfg, args.alpha, args.chunk)
            times.append((time.perf_counter() - start, time.process_time() - cpu))
    except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as RuntimeError
        print(json.dumps({"error": str(err).splitlines()[0][:120]}))
        return
    grad_norm = float(inputs[1].grad.norm())
    print(
        json.dumps(
            {
                "time_s": min(t[0] for t in times),
                "cpu_s": min(t[1] for t in times),
                "peak_mib": _max_rss_mib() - base,
                "loss": loss,
                "grad_w_norm": grad_norm,
            }
        )
    )


def _run_case(method: str, vocab: int, args: argparse.Namespace) -> dict:
    options = {"vocab": vocab, "chunk": args.chunk}
    options |= {
        k: getattr(args, k) for k in ("hidden", "tokens", "repeats", "loss", "temperature", "alpha", "limit_gib")
    }
    cmd = [sys.executable, __file__, "--worker", method]
    cmd += [arg for k, v in options.items() if v is not None for arg in (f"--{k.replace('_', '-')}", str(v))]
    # glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed buffers stay in
    # the heap and RSS counts fragmentation; a fixed threshold returns every large buffer to the OS on free,
    # so ru_maxrss measures the live peak (same setting for every method).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="V = 32,768 and 512 tokens only (< 1 min)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32_768, 262_144])
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2, help="forward+backward runs per case; the minimum is reported")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--loss", default="fkl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: default_chunk_size(V))")
    p.add_argument("--limit-gib", type=float, default=18.0, help="address-space cap of a worker above its start")
    p.add_argument("--worker", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        args.vocab = args.vocab[0]
        return worker(args)
    if args.quick:
        args.vocab, args.tokens, args.repeats = [32_768], 512, 1

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; loss {args.loss}, T={args.temperature}, "
        f"H={args.hidden}, N={args.tokens} tokens, float32; peak = ru_maxrss growth over the inputs"
    )
    header = ("V", "method", "wall s", "cpu s", "peak MiB", "wall/dense", "cpu/dense", "mem/dense", "loss")
    print("{:>8} {:<16} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>10}".format(*header))
    for vocab in args.vocab:
        results = {m: _run_case(m, vocab, args) for m in args.methods}
        dense = results.get("dense", {})
        for method, r in results.items():
            if "error" in r:
                print(f"{vocab:>8} {method:<16} failed: {r['error']}")
                continue
            ratio_t = f"{r['time_s'] / dense['time_s']:.2f}x" if "time_s" in dense else "-"
            ratio_c = f"{r['cpu_s'] / dense['cpu_s']:.2f}x" if "cpu_s" in dense else "-"
            ratio_m = f"{r['peak_mib'] / dense['peak_mib']:.3f}" if "peak_mib" in dense else "-"
            row = (vocab, method, r["time_s"], r["cpu_s"], r["peak_mib"], ratio_t, ratio_c, ratio_m, r["loss"])
            print("{:>8} {:<16} {:>8.2f} {:>8.2f} {:>9.0f} {:>10} {:>9} {:>9} {:>10.5f}".format(*row))


if __name__ == "__main__":
    main()
