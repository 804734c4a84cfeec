"""Sparse teacher targets: the teacher's top-k ids and log-probs per token, plus the tail mass.

An offline teacher cache stores, per token, `SparseTargets` instead of the full distribution over a
262k vocabulary. A KD loss on such targets compares the student with the teacher on a smaller *view*
of the vocabulary, chosen by `tail`:

- ``"renorm"``: both distributions renormalized over the k kept ids (k categories). The student gets
  no signal about the mass it puts outside the k ids (only CE pulls it back), and the teacher's tail
  mass is dropped, so the target overweights the head by 1 / (1 - tail).
- ``"bucket"``: the k kept ids plus one extra category holding everything else: the teacher's tail
  mass and the student's mass outside the k ids (k + 1 categories). The student's total tail mass is
  matched, but not how it spreads inside the tail. For f-divergences (fkl, rkl, jsd, tvd, skl, srkl)
  this coarse-graining can only lower the divergence (data-processing inequality): the bucket view is a
  lower bound of the full-vocabulary value, and the bound is tight when the teacher's tail is small.

Every divergence of the registry is defined on any pair of distributions, so every loss (fkl, rkl,
jsd, tvd, skl, srkl, akl) works on both views; with k = V both views equal the dense loss exactly.
Log-probs are stored at a temperature (the cache's); the loss must use the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from potstill.errors import UserError
from potstill.losses import Divergence, KDTerms, per_token_divergence, shifted_targets

TailMode = Literal["renorm", "bucket"]
# Log-mass given to an empty category (a bucket with nothing in it). Finite, so neither log(0) nor
# 0 * inf appears, and exp(-1e4) is exactly 0 in float32/64, so an empty bucket adds exactly nothing.
EMPTY_LOG_MASS = -1.0e4


@dataclass(frozen=True)
class SparseTargets:
    """Top-k teacher targets for a set of token positions.

    Attributes:
        ids: [..., k] long, the teacher's top-k token ids, most probable first.
        logprobs: [..., k] float, log p_teacher(id) at `temperature` (normalized over the full vocabulary).
        tail: [...] float, 1 - sum(exp(logprobs)): the teacher mass outside the k ids (>= 0).
        temperature: the softmax temperature the log-probs were computed at.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    temperature: float = 1.0

    @property
    def k(self) -> int:
        """Number of kept ids per position."""
        return self.ids.shape[-1]

    def rows(self, index: torch.Tensor | slice) -> SparseTargets:
        """Targets of selected positions of a flat [N, k] set (for masking and chunking)."""
        return replace(self, ids=self.ids[index], logprobs=self.logprobs[index], tail=self.tail[index])

    def truncate(self, k: int) -> SparseTargets:
        """The k most probable of the kept ids (what `topk_targets` at k gives), the rest added to the tail."""
        if not 1 <= k <= self.k:
            raise UserError(f"top-k targets: k must be in [1, {self.k}] (the ids stored), got {k}")
        logprobs = self.logprobs[..., :k]
        tail = (-torch.expm1(torch.logsumexp(_upcast(logprobs), dim=-1))).clamp_min(0.0).to(self.tail.dtype)
        return replace(self, ids=self.ids[..., :k], logprobs=logprobs, tail=tail)

    def flatten(self) -> SparseTargets:
        """[..., k] -> [N, k] (and tail [...] -> [N])."""
        return replace(
            self,
            ids=self.ids.reshape(-1, self.k),
            logprobs=self.logprobs.reshape(-1, self.k),
            tail=self.tail.reshape(-1),
        )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; anything else is computed in float32."""
    return x if x.dtype == torch.float64 else x.float()


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    """Keep the teacher's k most probable tokens per position, with their log-probs and the tail mass.

    Args:
        teacher_logits: [..., V] logits.
        k: ids to keep, 1 <= k <= V.
        temperature: softmax temperature T > 0 of the stored log-probs.

    Returns:
        SparseTargets with ids/logprobs [..., k] (most probable first) and tail [...]; tail is exactly 0 at k = V.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise UserError(f"top-k targets: k must be in [1, {vocab}] (the vocabulary size), got {k}")
    if temperature <= 0:
        raise UserError(f"top-k targets: temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    logprobs, ids = logp.topk(k, dim=-1)
    # -expm1(logsumexp) = 1 - kept mass, without the cancellation of 1 - sum(p).
    tail = (-torch.expm1(torch.logsumexp(logprobs, dim=-1))).clamp_min(0.0)
    if k == vocab:
        tail = torch.zeros_like(tail)
    return SparseTargets(ids=ids, logprobs=logprobs, tail=tail, temperature=temperature)


def restrict_targets(targets: SparseTargets, id_map: torch.Tensor, teacher_vocab: int) -> SparseTargets:
    """Targets over a trimmed student vocabulary: teacher ids -> student ids, renormalized over the student's ids.

    As for text students (`teacher.online`), the teacher's distribution is restricted to the ids the student
    has and renormalized: a stored id the student lacks loses its mass (its slot gets a student id not stored in
    that row, at log-prob EMPTY_LOG_MASS: a category with no teacher mass), and the kept log-probs and the tail
    are divided by the kept mass. The tail's ids are not stored; it is taken to lie in the student's vocabulary.

    Args:
        targets: [..., k] targets in teacher ids.
        id_map: [V_student] long, student id -> teacher id.
        teacher_vocab: the teacher's vocabulary size.

    Returns:
        [..., min(k, V_student)] targets in student ids, most probable first, each row's ids distinct.
    """
    inverse = torch.full((teacher_vocab,), -1, dtype=torch.long)
    inverse[id_map] = torch.arange(len(id_map))
    flat = targets.flatten()
    ids = inverse[flat.ids.long()]  # [N, k]
    # Lost ids to the end of each row (keeps the most-probable-first order); at most V_student slots stay.
    order = torch.sort((ids < 0).to(torch.uint8), dim=1, stable=True).indices[:, : len(id_map)]
    ids, logprobs = ids.gather(1, order), _upcast(flat.logprobs).gather(1, order)
    lacking = ids < 0
    lost = torch.where(lacking, logprobs.exp(), torch.zeros_like(logprobs)).sum(-1)  # [N]
    kept = (1.0 - lost).clamp_min(1e-6)
    # Free ids of each row, lowest first: a stable sort puts the ids the row does not hold in front.
    held = torch.zeros(ids.shape[0], len(id_map), dtype=torch.bool)
    held.scatter_(1, ids.clamp_min(0), ~lacking)
    free = torch.sort(held.to(torch.uint8), dim=1, stable=True).indices
    rank = (lacking.cumsum(1) - 1).clamp_min(0)
    ids = torch.where(lacking, free.gather(1, rank), ids)
    logprobs = torch.where(lacking, torch.full_like(logprobs, EMPTY_LOG_MASS), logprobs - kept.log()[:, None])
    shape = (*targets.ids.shape[:-1], ids.shape[1])
    return replace(
        targets,
        ids=ids.reshape(shape),
        logprobs=logprobs.to(targets.logprobs.dtype).reshape(shape),
        tail=(flat.tail / kept).to(targets.tail.dtype).reshape(shape[:-1]),
    )


def check_temperature(targets: SparseTargets, div: Divergence) -> None:
    """Sparse log-probs are tempered once, when cached: the loss must use the same temperature."""
    if abs(targets.temperature - div.temperature) > 1e-6:
        raise UserError(
            f"config: loss.temperature: the sparse teacher targets were built at temperature {targets.temperature}, "
            f"the loss uses {div.temperature}; set loss.temperature={targets.temperature} or rebuild the cache"
        )


def sparse_views(
    student_logits: torch.Tensor, targets: SparseTargets, temperature: float, tail: TailMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the sparse view of the vocabulary.

    Args:
        student_logits: [N, V] logits (any float dtype; upcast to float32, float64 kept).
        targets: [N, k] sparse targets.
        temperature: T; the student is tempered here, the teacher log-probs already are.
        tail: "renorm" (k categories) or "bucket" (k + 1, the last one = everything outside the k ids).

    Returns:
        (student, teacher) [N, k] or [N, k + 1] log-probs (unnormalized by at most rounding for renorm:
        the divergence's own log-softmax renormalizes them).
    """
    scaled = _upcast(student_logits) / temperature
    kept = scaled.gather(-1, targets.ids)
    teacher = targets.logprobs.to(scaled.dtype)
    if tail == "renorm":
        return kept, teacher
    if tail != "bucket":
        raise UserError(f"config: loss.sparse_tail: must be 'renorm' or 'bucket' (got {tail!r})")
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    # Student mass outside the kept ids: a logsumexp over the other logits. Kept ids are filled with a
    # finite very negative logit (not -inf), so k = V gives an empty bucket without NaN gradients.
    fill = (scaled.detach().amin(dim=-1, keepdim=True) + EMPTY_LOG_MASS).expand_as(targets.ids)
    outside = scaled.scatter(-1, targets.ids, fill)
    student_rest = torch.logsumexp(outside, dim=-1, keepdim=True)
    teacher_rest = torch.log(targets.tail.to(scaled.dtype)).clamp_min(EMPTY_LOG_MASS).unsqueeze(-1)
    student = torch.cat([kept, student_rest], dim=-1) - lse
    return student, torch.cat([teacher, teacher_rest], dim=-1)


def sparse_divergence(
    student_logits: torch.Tensor, targets: SparseTargets, div: Divergence, tail: TailMode | None = None
) -> torch.Tensor:
    """Per-token divergence D(p_teacher || q_student) of `div.name` on the sparse view.

    Args:
        student_logits: [N, V] logits.
        targets: [N, k] sparse targets at temperature `div.temperature`.
        div: the divergence (name, parameters, temperature, sparse_tail).
        tail: overrides `div.sparse_tail`.

    Returns:
        [N] divergence per token (float32, float64 for float64 input).
    """
    check_temperature(targets, div)
    student, teacher = sparse_views(student_logits, targets, div.temperature, tail or div.sparse_tail)
    # The views are already tempered log-probs: apply the registry's divergence at T = 1.
    return per_token_divergence(student, teacher, replace(div, temperature=1.0))


def sparse_kd_terms(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    div: Divergence,
    num_tokens: int | torch.Tensor | None = None,
    tail: TailMode | None = None,
) -> KDTerms:
    """`kd_terms` with sparse teacher targets instead of teacher logits (the unfused path).

    Args:
        student_logits: [B, T, V] logits; position t predicts token t + 1.
        targets: [B, T, k] sparse targets aligned with the student logits (position t = next-token targets).
        labels: [B, T] unshifted labels, -100 = no loss (shifted here, like `kd_terms`).
        div: the divergence.
        num_tokens: normalizer (global unmasked count); defaults to this batch's unmasked count.
        tail: overrides `div.sparse_tail`.

    Returns:
        KDTerms(kd, ce, n_tokens): sums over unmasked tokens divided once by num_tokens; zeros when all masked.
    """
    rows, next_ids = shifted_targets(labels)
    logits = student_logits.reshape(-1, student_logits.shape[-1])[rows]
    denom = torch.as_tensor(rows.numel() if num_tokens is None else num_tokens, device=logits.device).clamp_min(1)
    kd = sparse_divergence(logits, targets.flatten().rows(rows), div, tail).sum() / denom
    ce = F.cross_entropy(_upcast(logits), next_ids, reduction="sum") / denom
    return KDTerms(kd=kd, ce=ce, n_tokens=rows.numel())
