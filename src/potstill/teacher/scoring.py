"""A teacher that is only a server: token log-probs of given sequences from an OpenAI-compatible endpoint.

`EndpointScorer` sends batches of token ids to `POST /v1/completions` with `echo: true`, `logprobs: K`,
`max_tokens: 0`, `temperature: 0` (the legacy completions API as vLLM serves it), and reads back, for every
position i > 0 of each sequence, the teacher's log-prob of the actual token (`token_logprobs[i]`) and its K most
probable tokens (`top_logprobs[i]`). Position 0 has nothing before it (`null`). Token strings are read as
`token_id:N` (vLLM's `return_tokens_as_token_ids`, asked for in every request), else as tokens of the student's
vocabulary, else as the text of exactly one student token; anything else is refused.

Requests go through `EndpointClient.retrying` (retries with backoff and jitter on 429, 5xx, timeouts, dropped
connections and malformed answers; a timeout per attempt), `batch_size` sequences per request, `concurrency`
requests in flight. `self_test` runs before training: the endpoint must tokenize a probe text as the student's
tokenizer does, and score the same tokens twice within `tolerance`.

The scores of a batch come back aligned with the student's logits (`TeacherScores`): position t holds what
predicts token t + 1, as a teacher cache's `SparseTargets` do, so the sparse losses (`losses/sparse.py`, top-K
ids plus a bucket for the rest) and the sampled reverse KL use them unchanged. They are log-probs at temperature 1
(what the endpoint returns), so `loss.temperature` must be 1.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from potstill.errors import UserError
from potstill.losses.sparse import EMPTY_LOG_MASS, SparseTargets
from potstill.teacher.endpoint import EndpointClient, EndpointError

log = logging.getLogger(__name__)

PROBE_TEXT = "Distillation: a teacher grades 12 + 34 = 46 tokens, déjà vu.\n  def f(x):\n\treturn x"
_ID_PREFIX = "token_id:"
_NEEDS = "scoring needs /v1/completions with echo, logprobs and max_tokens 0 (as vLLM serves it)"


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's scores of a batch [B, L], aligned with the student's logits (position t predicts t + 1).

    Attributes:
        token_logprobs: [B, L] float32, log p_teacher(input_ids[t + 1] | input_ids[: t + 1]); 0 where t + 1 is
            padding or past the end.
        targets: [B, L, k] the teacher's top-k per position (temperature 1; uniform filler where nothing is known).
    """

    token_logprobs: torch.Tensor
    targets: SparseTargets


class EndpointScorer:
    """The teacher's log-probs of token sequences, from an OpenAI-compatible `/v1/completions` endpoint.

    Args:
        client: an `EndpointClient` for the endpoint (its model name, timeouts and retries).
        tokenizer: the student's tokenizer (reads token strings that are not `token_id:N`).
        top_k: teacher tokens per position (`logprobs` of the request).
        batch_size: sequences per request.
        tolerance: `self_test`: largest difference in nats allowed between two scorings of the same tokens.
    """

    def __init__(self, client: EndpointClient, tokenizer, top_k: int = 20, batch_size: int = 8, tolerance=1e-3):
        self.client, self.top_k, self.batch_size, self.tolerance = client, top_k, batch_size, tolerance
        self._vocab = tokenizer.get_vocab()
        self._tokenizer = tokenizer
        self._texts: dict[str, int] | None = None  # decoded text of one token -> id, built when first needed

    @property
    def where(self) -> str:
        return f"teacher endpoint {self.client.base_url}"

    def score_ids(self, seqs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Score token sequences (each at least 1 token).

        Returns:
            Per sequence of n tokens: (token_logprobs [n] float32 with NaN at 0, top ids [n, k] long,
            top log-probs [n, k] float32; row 0 is filler); k = `top_k`.
        """
        chunks = [seqs[i : i + self.batch_size] for i in range(0, len(seqs), self.batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.client.concurrency, len(chunks)))) as pool:
            results = list(pool.map(self._score_chunk, chunks))
        return [row for chunk in results for row in chunk]

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TeacherScores:
        """The teacher's scores of a batch of student token ids (the positions where `attention_mask` is 1).

        Args:
            input_ids: [B, L] long.
            attention_mask: [B, L] (None: every position), ones on the real tokens.

        Returns:
            `TeacherScores` on `input_ids`'s device.
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ids, keep = input_ids.cpu(), mask.cpu().bool()
        rows = [ids[b][keep[b]].tolist() for b in range(len(ids))]
        scored = self.score_ids(rows)
        (batch, length), k = ids.shape, self.top_k
        token_lp = torch.zeros(batch, length)
        top_ids = torch.arange(k).expand(batch, length, k).clone()
        top_lp = torch.full((batch, length, k), -math.log(k))  # filler (never scored): uniform over k ids, no tail
        for b, (lp, t_ids, t_lp) in enumerate(scored):
            at = keep[b].nonzero()[:, 0]  # the positions of the real tokens, in order
            if len(at) < 2:
                continue
            prev = at[:-1]  # the position whose logits predict the next real token
            token_lp[b, prev], top_ids[b, prev], top_lp[b, prev] = lp[1:], t_ids[1:], t_lp[1:]
        tail = (-torch.expm1(torch.logsumexp(top_lp, dim=-1))).clamp_min(0.0)  # 1 - kept mass, without cancellation
        device = input_ids.device
        targets = SparseTargets(ids=top_ids.to(device), logprobs=top_lp.to(device), tail=tail.to(device))
        return TeacherScores(token_logprobs=token_lp.to(device), targets=targets)

    def self_test(self, tokenizer) -> None:
        """Before training: the endpoint tokenizes a probe text as `tokenizer` does, and scores deterministically.

        Raises:
            UserError: one line: no echo/logprobs support, another tokenizer (the first differing token), or two
                scorings of the same tokens that differ by more than `tolerance`.
        """
        expected = tokenizer(PROBE_TEXT)["input_ids"]
        try:
            (choice,) = self._request(PROBE_TEXT, 1)
        except EndpointError as err:
            raise EndpointError(f"{err}; {_NEEDS}") from None
        served = self._token_ids(choice, None)
        bos = tokenizer.bos_token_id
        a, b = (x[1:] if x[:1] == [bos] else x for x in (served, expected))  # a server may add <bos>, or not
        if a != b:
            at = next((i for i, (s, e) in enumerate(zip(a, b, strict=False)) if s != e), min(len(a), len(b)))
            show = [tokenizer.convert_ids_to_tokens(x[at]) if at < len(x) else "the end" for x in (a, b)]
            raise UserError(
                f"{self.where} tokenizes the probe text differently from the student's tokenizer ({len(a)} vs"
                f" {len(b)} tokens; token {at}: {show[0]!r} vs {show[1]!r}): it must serve a teacher with the"
                " student's tokenizer"
            )
        first, second = self.score_ids([expected, expected])  # one request: the same tokens twice, batched
        (again,) = self.score_ids([expected])
        diff = max(_max_diff(first, x) for x in (second, again))
        if diff > self.tolerance:
            raise UserError(
                f"{self.where} is not deterministic: the same tokens scored twice differ by {diff:.3g} nats"
                f" (> teacher.endpoint.tolerance {self.tolerance}); serve the teacher without sampling noise"
                " (temperature 0, a fixed seed, batch-invariant kernels) or raise the tolerance"
            )
        log.info("%s: probe tokenization agrees (%d tokens), scores repeat within %.2g nats", self.where, len(b), diff)

    def _score_chunk(self, seqs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        choices = self._request(seqs, self.top_k)
        if len(choices) != len(seqs):
            raise EndpointError(f"{self.where}: {len(choices)} answers for {len(seqs)} prompts; {_NEEDS}")
        return [self._parse(choice, seq) for choice, seq in zip(choices, seqs, strict=True)]

    def _request(self, prompt: Any, top_k: int) -> list[Any]:
        """One scoring request (retried): the answer's choices in prompt order."""

        def send():
            resp = self.client.client.completions.create(
                model=self.client.model,
                prompt=prompt,
                echo=True,
                logprobs=top_k,
                max_tokens=0,
                temperature=0.0,
                extra_body={"return_tokens_as_token_ids": True},
            )
            return sorted(resp.choices, key=lambda c: c.index)

        return self.client.retrying(send)

    def _parse(self, choice: Any, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        served = self._token_ids(choice, seq)
        n, k = len(seq), self.top_k
        if served[:n] != seq:
            raise EndpointError(f"{self.where} echoed other tokens than the ids it was sent; {_NEEDS}")
        lp = choice.logprobs
        token_lp = torch.tensor([float("nan")] + [float(x) for x in lp.token_logprobs[1:n]], dtype=torch.float32)
        top_ids, top_lp = torch.zeros(n, k, dtype=torch.long), torch.full((n, k), EMPTY_LOG_MASS)
        for i in range(1, n):
            top = lp.top_logprobs[i]
            if not isinstance(top, dict) or not top:
                raise EndpointError(f"{self.where}: no top log-probs at position {i}; {_NEEDS}")
            best = sorted(((float(v), self._id(t)) for t, v in top.items()), reverse=True)[:k]
            ids = [j for _, j in best]
            # fewer than k answers: fill with ids not among them, at zero teacher mass (the tail keeps the rest)
            taken = set(ids)
            ids += [j for j in range(2 * k) if j not in taken][: k - len(ids)]
            top_ids[i] = torch.tensor(ids)
            top_lp[i, : len(best)] = torch.tensor([v for v, _ in best])
        return token_lp, top_ids, top_lp

    def _token_ids(self, choice: Any, seq: list[int] | None) -> list[int]:
        """The echoed prompt's token ids of an answer (checked to hold prompt log-probs)."""
        lp = getattr(choice, "logprobs", None)
        fields = [getattr(lp, name, None) for name in ("tokens", "token_logprobs", "top_logprobs")]
        if lp is None or any(not isinstance(f, list) for f in fields):
            raise EndpointError(f"{self.where}: the answer holds no echoed prompt log-probs; {_NEEDS}")
        tokens = fields[0]
        if seq is not None and len(tokens) < len(seq):
            raise EndpointError(f"{self.where} echoed {len(tokens)} tokens for a prompt of {len(seq)}; {_NEEDS}")
        return [self._id(t) for t in (tokens if seq is None else tokens[: len(seq)])]

    def _id(self, token: str) -> int:
        """A token string of the answer as a student token id."""
        if token.startswith(_ID_PREFIX) and token[len(_ID_PREFIX) :].isdigit():
            return int(token[len(_ID_PREFIX) :])
        if token in self._vocab:
            return self._vocab[token]
        if self._texts is None:
            texts: dict[str, list[int]] = {}
            for i in range(len(self._tokenizer)):
                texts.setdefault(self._tokenizer.decode([i]), []).append(i)
            self._texts = {t: ids[0] for t, ids in texts.items() if len(ids) == 1}
        if token in self._texts:
            return self._texts[token]
        raise EndpointError(
            f"{self.where} answered with the token {token!r}, which is not one token of the student's vocabulary;"
            " serve with token ids (vLLM: --return-tokens-as-token-ids)"
        )


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """Largest difference in nats between two scorings of one sequence: the actual tokens' and the top-k log-probs
    (compared by rank, so near-ties that swap places count by their values)."""
    if len(a[0]) < 2:
        return 0.0
    return max(float((a[0][1:] - b[0][1:]).abs().max()), float((a[2][1:] - b[2][1:]).abs().max()))


def sampled_teacher_logprobs(teacher, inputs: dict[str, Any], mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's log-probs of the scored tokens of a batch (what the sampled reverse KL needs, nothing more).

    Args:
        teacher: an `OnlineTeacher` (full logits, tempered here) or an `EndpointScorer` (its log-probs of the actual
            tokens; temperature 1, which the config enforces).
        inputs: `input_ids`, `attention_mask`, `labels` [B, L].
        mask: [B, L - 1] bool, `losses.scored_mask(labels)` (position t predicts token t + 1).
        temperature: the loss temperature.

    Returns:
        [n] float32, n = mask.sum(), in the order of `labels[:, 1:][mask]`.
    """
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    if isinstance(teacher, EndpointScorer):
        return teacher.score(ids, attention).token_logprobs[:, :-1][mask]
    targets = inputs["labels"][:, 1:][mask]
    logits = teacher.logits(ids, attention)[:, :-1][mask].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, targets[:, None])[:, 0]
