"""Size and speed of a model: parameter count (tied weights once) and greedy latency per generated token; and
`potstill bench`: size on disk, peak memory, prompt and generation tokens/s of an HF directory, GGUF or ONNX file.

Latency is what a user of the model feels when it writes text: batch 1, greedy, a fixed number of new
tokens (end-of-sequence ignored). Each generated token is time-stamped through a streamer; the first
`warmup` tokens (prompt prefill, allocator warm-up) are excluded, and the median of a few runs is reported.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from potstill.errors import UserError


def param_count(model: nn.Module) -> int:
    """Number of parameters, counting shared storage (tied embedding / head) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, param in model.named_parameters(remove_duplicate=False):
        key = (param.data_ptr(), param.numel())
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


class _TokenClock(BaseStreamer):
    """Records the time at which `generate` hands over each new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def latency_ms_per_token(
    model: nn.Module, tokenizer, prompt: str, new_tokens: int = 32, warmup: int = 4, runs: int = 3
) -> float:
    """Median milliseconds per generated token, greedy, batch 1, after `warmup` tokens.

    Args:
        model: a causal LM (eval mode is set here).
        tokenizer: its tokenizer (the prompt is encoded with its special tokens, e.g. <bos>).
        prompt: the text to continue (use the same text for every model compared).
        new_tokens: tokens timed per run (after the warm-up ones).
        warmup: tokens generated first and not timed (the first includes the prompt's prefill).
        runs: repetitions; the median is returned.

    Returns:
        Milliseconds per token.
    """
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    total = warmup + new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_run = []
    with torch.inference_mode():
        for _ in range(runs):
            clock = _TokenClock()
            model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=total,
                min_new_tokens=total,
                pad_token_id=pad,
                streamer=clock,
            )
            stamps = clock.times[warmup - 1 :] if warmup else clock.times
            per_run.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000.0)
    return statistics.median(per_run)


# ---- any model file: size, peak memory, prompt and generation tokens/s (`potstill bench`) ----

BENCH_IDS_START = 4  # prompt ids: a fixed cycle over ids 4..259, which every vocabulary has (speed ignores meaning)


def bench_prompt(n: int) -> list[int]:
    """The benchmark's prompt: `n` fixed token ids (no tokenizer needed, so any file can be timed alike)."""
    return [BENCH_IDS_START + (37 * i) % 256 for i in range(n)]


def model_kind(path: Path) -> str:
    """ "hf" (a directory), "gguf" or "onnx" by the file's suffix; UserError otherwise."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a model directory (expected config.json)")
        return "hf"
    if not path.is_file():
        raise UserError(f"{path}: no such model file or directory")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("gguf", "onnx"):
        raise UserError(f"{path}: expected an HF model directory, a .gguf or an .onnx file")
    return kind


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of a directory's weight files (*.safetensors, *.bin)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def bench_targets(paths: Sequence[str | Path], dtypes: Sequence[str] = ("float32", "bfloat16")) -> list[tuple]:
    """(path, kind, dtype) to time: each HF directory once per dtype, each file once (dtype None)."""
    targets = []
    for p in map(Path, paths):
        kind = model_kind(p)
        targets += [(p, kind, d) for d in dtypes] if kind == "hf" else [(p, kind, None)]
    return targets


def bench_model(
    path: str | Path,
    kind: str,
    dtype: str | None,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    runs: int = 3,
    threads: int = 1,
) -> dict:
    """Time one model in a fresh process (its peak memory is its own): batch 1, greedy, end-of-sequence ignored.

    Returns:
        {"model", "kind", "dtype", "bytes", "peak_rss_mb", "prompt_tok_s", "gen_tok_s"}: the medians of `runs`
        runs after one untimed warm-up; peak RSS of the whole process (Python, the runtime and the model).
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        speeds = pool.apply(_bench_in_child, (str(path), kind, dtype, prompt_tokens, new_tokens, runs, threads))
    return {"model": str(path), "kind": kind, "dtype": dtype, "bytes": disk_bytes(Path(path)), **speeds}


def _bench_in_child(path: str, kind: str, dtype: str | None, prompt_tokens: int, new_tokens: int, runs: int,
                    threads: int) -> dict:  # fmt: skip
    torch.set_num_threads(threads)
    ids = bench_prompt(prompt_tokens)
    if kind == "hf":
        from potstill.models.load import load_model, quiet_hf_progress

        with quiet_hf_progress():
            model, _ = load_model(path, dtype=dtype)
        runner = _HFTimer(model)
    elif kind == "gguf":
        from potstill.export.runtime import LlamaCppModel

        runner = LlamaCppModel(path, n_ctx=prompt_tokens + new_tokens + 8, threads=threads)
    else:
        from potstill.export.runtime import OnnxModel

        runner = OnnxModel(path, threads=threads)
    runner.generate_timed(ids[:8], 4)  # warm-up: allocations, lazy initialisation
    timed = [runner.generate_timed(ids, new_tokens) for _ in range(runs)]
    prompt_speed, gen_speed = (statistics.median(x) for x in zip(*timed, strict=True))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    return {"peak_rss_mb": peak_kb / 1024, "prompt_tok_s": prompt_speed, "gen_tok_s": gen_speed}


class _HFTimer:
    """`generate_timed` for an HF model: prompt speed from the first token's time, generation from the rest."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def generate_timed(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        clock = _TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                streamer=clock,
            )
        first, last = clock.times[0], clock.times[-1]
        return len(ids) / (first - start), (len(clock.times) - 1) / (last - first)


def bench_table(rows: Sequence[dict]) -> str:
    """The rows of `bench_model` as one Markdown table."""
    lines = [
        "| model | format | size (MB) | peak RSS (MB) | prompt tok/s | generation tok/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        fmt = f"HF {r['dtype']}" if r["kind"] == "hf" else r["kind"].upper()
        lines.append(f"| {r['model']} | {fmt} | {r['bytes'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['prompt_tok_s']:.1f} | {r['gen_tok_s']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
