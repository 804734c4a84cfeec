"""The model side of `potstill serve`: streamed generation with exact stop strings, and token log-probs (scoring).

`Engine.generate` runs `model.generate` (the arguments of `teacher.generate.generation_kwargs`, so a served answer is
the one `hf_generate` gives locally) with a streamer that turns each step's new tokens into text deltas per
sequence: text is held back while it ends in an incomplete UTF-8 character or in the beginning of a stop string,
and a sequence ends at its EOS token, at the first stop string (cut before it) or after `max_tokens` tokens.
`Engine.logprobs` is one forward pass over given token sequences: the log-prob of every token after the first and
the top-k tokens at each position (temperature 1), which `/v1/completions` returns for `echo` + `logprobs`.

Neither is thread-safe: the app runs one call at a time (see `serve.app`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from potstill.models.specials import end_ids
from potstill.teacher.generate import adds_bos, cut_at_stop, generation_kwargs

# emit(sequence index, text delta, finish reason or None), called from the generating thread
Emit = Callable[[int, str, str | None], None]


@dataclass
class Sequence:
    """One generated sequence as it grows: its token ids, the text sent so far, and why it ended (None: running)."""

    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finish: str | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Scores of one token sequence of n tokens (position 0 has nothing before it).

    Attributes:
        token: [n - 1] log p(ids[i] | ids[:i]) for i = 1..n-1.
        top_ids, top: [n - 1, k] the k most probable next tokens at each of those positions and their log-probs.
    """

    token: torch.Tensor
    top_ids: torch.Tensor
    top: torch.Tensor


class Engine:
    """A causal LM and its tokenizer, serving generation and scoring.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.eos = set(end_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)

    def encode(self, text: str) -> list[int]:
        """The token ids of a text prompt (with the tokenizer's BOS unless the text already starts with it)."""
        return self.tokenizer(text, add_special_tokens=adds_bos([text], self.tokenizer))["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: list[list[int]], params: dict[str, Any], emit: Emit, cancel: threading.Event):
        """Generate `params["n"]` sequences per prompt, reporting text as it comes through `emit`.

        Args:
            prompts: B token-id lists (each non-empty).
            params: max_tokens (>= 1), temperature (0 = greedy), top_p, n, seed (None: a random one), stop (list),
                no_repeat_ngram_size (0 = off).
            emit: called with (index, delta, finish) where index = prompt * n + sample; the last call of every
                sequence has finish "stop" (EOS or a stop string) or "length".
            cancel: set it to end generation early (a client went away); the sequences then end as "length".

        Returns:
            The B * n `Sequence`s (their generated token ids, EOS included).
        """
        from transformers import StoppingCriteria

        n, greedy = params.get("n", 1), params.get("temperature", 0.0) == 0
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        seed = params.get("seed")
        torch.manual_seed(int.from_bytes(os.urandom(4), "little") if seed is None else seed)
        if greedy:  # one sequence per prompt, repeated n times (as hf_generate does)
            emit_all = emit
            emit = lambda i, text, finish: [emit_all(i * n + j, text, finish) for j in range(n)]  # noqa: E731
        streamer = _DeltaStreamer(self, params.get("stop") or [], emit)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs = generation_kwargs(params, self.tokenizer) | {"streamer": streamer, "stopping_criteria": [Cancelled()]}
        device = self.model.device
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        return [s for s in streamer.seqs for _ in range(n)] if greedy else streamer.seqs

    def logprobs(self, seqs: list[list[int]], k: int, batch: int = 8) -> list[TokenLogprobs]:
        """Log-probs of each sequence's tokens and the top-k next tokens at each position (right-padded batches).

        Args:
            seqs: token-id lists (each at least 1 token).
            k: top tokens per position (0: none, `top_ids` and `top` are [n - 1, 0]).
            batch: sequences per forward pass.
        """
        out = []
        for start in range(0, len(seqs), batch):
            chunk = seqs[start : start + batch]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in chunk], device=self.model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.model.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for row, seq in zip(logits, chunk, strict=True):
                lp = torch.log_softmax(row[: len(seq) - 1].float(), -1).cpu()  # position t predicts token t + 1
                top, top_ids = lp.topk(k, dim=-1)
                out.append(TokenLogprobs(lp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0], top_ids, top))
        return out


class _DeltaStreamer:
    """A `model.generate` streamer (put/end) that turns new tokens [rows] into text deltas per sequence."""

    def __init__(self, engine: Engine, stop: list[str], emit: Emit):
        self.engine, self.stop, self.emit = engine, stop, emit
        self.seqs: list[Sequence] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call holds the prompts
            self.prompt_seen = True
            return
        if not self.seqs:  # one row per sequence (prompts x samples)
            self.seqs = [Sequence() for _ in range(value.shape[0])]
        for i, token in enumerate(value.reshape(-1).tolist()):
            seq = self.seqs[i]
            if seq.finish is None:
                seq.tokens.append(token)
                self._advance(i, seq, eos=token in self.engine.eos)

    def end(self) -> None:
        for i, seq in enumerate(self.seqs):
            if seq.finish is None:
                self._advance(i, seq, eos=False, last=True)

    def _advance(self, i: int, seq: Sequence, eos: bool, last: bool = False) -> None:
        text = self.engine.decode(seq.tokens)
        cut = cut_at_stop(text, self.stop)
        if len(cut) < len(text) or eos or last:
            seq.finish = "stop" if len(cut) < len(text) or eos else "length"
            ready = cut
        else:
            ready = text[: len(text) - _held_back(text, self.stop)]
        if ready.startswith(seq.sent) and (len(ready) > len(seq.sent) or seq.finish):
            delta, seq.sent = ready[len(seq.sent) :], ready
            self.emit(i, delta, seq.finish)
        elif seq.finish:  # the text before the cut changed under a later token: end without retracting
            self.emit(i, "", seq.finish)


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` must wait: an incomplete character, or the start of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:size]):
                hold = max(hold, size)
                break
    return hold
