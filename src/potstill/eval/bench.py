"""Size and speed of a model: parameter count (tied weights once) and greedy latency per generated token.

Latency is what a user of the model feels when it writes text: batch 1, greedy, a fixed number of new
tokens (end-of-sequence ignored). Each generated token is time-stamped through a streamer; the first
`warmup` tokens (prompt prefill, allocator warm-up) are excluded, and the median of a few runs is reported.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer


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
