"""Fused chunked KD loss: lm_head + divergence + CE without ever holding [tokens x V] logits.

The dense path materializes student and teacher logits ([N, V] each, 2 GiB per tensor at N = 2048,
V = 262,144 in float32) plus the divergence's intermediates and their gradients. Here the loss takes the
student's final hidden states and head weight instead, and walks over chunks of masked-in tokens: each
chunk's logits are computed, scored (divergence at temperature T via the loss registry, so every loss
works, plus hard-label CE at T = 1) and dropped. Peak memory is O(chunk x V) on top of the head's gradient.

Gradients. The forward returns two scalars, kd and ce, so the caller can weight them
(`alpha * T^2 * kd + (1 - alpha) * ce`) and log them apart; the backward receives a grad for each and,
since the gradient is linear in them, recomputes each chunk once to get d(g_kd * kd + g_ce * ce)/d logits,
then `grad_hidden = g @ W` and `grad_W += g^T @ hidden`. Recomputing costs two extra matmuls per chunk
(student and teacher logits). When the caller knows its weights in advance it passes `loss_weights`; the
gradient is then computed during the forward (one pass, no recompute, the speed of the dense path), kept
([N, H] + [V, H]) and scaled in backward by the factor the actual grads differ by. If the actual grads are
not proportional to `loss_weights` the backward falls back to recomputing, so the result is always exact.

Teacher: `TeacherHead` (teacher hidden states + head, logits computed per chunk, never stored) or
`SparseTargets` (top-k ids/log-probs from a cache, see `losses/sparse.py`) or None (CE only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from potstill.losses import IGNORE_INDEX, Divergence, KDTerms, per_token_divergence, per_token_divergence_and_grad
from potstill.losses.divergences import log_probs
from potstill.losses.sparse import SparseTargets, check_temperature, sparse_divergence

# Logit elements per chunk: 2^24 float32 = 64 MiB per [chunk, V] buffer (64 tokens at V = 262,144, 512 at
# 32,768). About 8 such buffers are alive at once (logits, teacher logits, log-probs, CE, the grad), so a
# chunk costs ~0.5 GiB whatever V is. Smaller chunks save memory but cost time: on CPU the chunk's matmuls
# stream the whole head once per chunk and need a few hundred rows to run at full speed (measured at
# V = 262,144: 16 rows = 2.1x the dense time, 64 rows = 1.25x; benchmarks/README.md, "Fused loss").
CHUNK_ELEMENTS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: about CHUNK_ELEMENTS logits, at least 8 tokens."""
    return max(8, CHUNK_ELEMENTS // vocab_size)


@dataclass(frozen=True)
class TeacherHead:
    """A teacher given as final hidden states + output head; its logits are computed per chunk.

    Attributes:
        hidden: [N, Ht] teacher final hidden states, aligned with the student's rows.
        weight: [V, Ht] teacher head (rows = the student's vocabulary, e.g. `W[id_map]` for a trimmed student).
        bias: [V] or None.
        softcap: Gemma-2-style final logit softcapping c (logits = tanh(z / c) * c), or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def rows(self, index: torch.Tensor | slice) -> TeacherHead:
        """The same teacher restricted to some token rows."""
        return replace(self, hidden=self.hidden[index])

    def logits(self) -> torch.Tensor:
        """[n, V] teacher logits of these rows (no grad), float32 (float64 kept)."""
        with torch.no_grad():
            return _head_logits(self.hidden, self.weight, self.bias, self.softcap)


Teacher = TeacherHead | SparseTargets | None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None):
    """[n, H] x [V, H] -> [n, V] upcast (and softcapped) logits."""
    return _softcap(_upcast(F.linear(hidden.to(weight.dtype), weight, bias)), cap)


def _chunk_sums(
    logits: torch.Tensor, teacher: Teacher, labels: torch.Tensor, div: Divergence
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Sums over the chunk's tokens of the divergence and of the CE (not yet normalized).

    Args:
        logits: [n, V] student logits (upcast, softcapped).
        teacher: the chunk's rows of the teacher, or None.
        labels: [n] target ids (all masked-in).
        div: the divergence.
    """
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if teacher is None:
        return None, ce
    if isinstance(teacher, SparseTargets):
        return sparse_divergence(logits, teacher, div).sum(), ce
    return per_token_divergence(logits, teacher.logits(), div).sum(), ce


@dataclass
class _Problem:
    """Everything one call needs besides the differentiable tensors (hidden, weight)."""

    teacher: Teacher
    labels: torch.Tensor  # [n] masked-in labels
    rows: torch.Tensor  # [n] their row index in hidden
    div: Divergence
    scale: float  # 1 / num_tokens
    chunk_size: int
    softcap: float | None

    def run(self, hidden, weight, weights, dtype):
        """`_run` on this problem (`PlannedHeadLoss`' interface)."""
        return _run(self, hidden, weight, weights, dtype)

    def chunks(self):
        """Yields (row index [c], labels [c], teacher rows) per chunk of masked-in tokens."""
        for start in range(0, self.rows.numel(), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            teacher = None if self.teacher is None else self.teacher.rows(part)
            yield self.rows[part], self.labels[part], teacher


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head matmuls' dtype: autocast's when it is on (mixed precision), else the weight's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _run(
    prob: _Problem,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    weights: tuple[float, float] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over the chunks: the two sums and, if `weights`, grads of w_kd * kd + w_ce * ce.

    The head's matmuls run in `dtype` (bfloat16 under mixed precision); logits are upcast before the loss and
    the gradients accumulate in the inputs' dtypes.

    Returns:
        (kd_sum, ce_sum, grad_hidden [N, H] | None, grad_weight [V, H] | None); sums already scaled.
    """
    hidden, weight = hidden.detach(), weight.detach()  # z below must be a leaf of the chunk's own graph
    acc = _upcast(torch.zeros((), device=hidden.device, dtype=weight.dtype))
    kd_sum, ce_sum = acc.clone(), acc.clone()
    grad_h = torch.zeros_like(hidden) if weights else None
    grad_w = torch.zeros_like(weight) if weights else None
    w = weight.to(dtype)
    for rows, labels, teacher in prob.chunks():
        h = hidden[rows].to(dtype)
        z = F.linear(h, w)
        if weights and prob.softcap is None and not isinstance(teacher, SparseTargets):
            kd, ce, g = _closed_form(z, teacher, labels, prob.div, (weights[0] * prob.scale, weights[1] * prob.scale))
        else:
            with torch.enable_grad():
                z.requires_grad_(weights is not None)
                kd, ce = _chunk_sums(_softcap(_upcast(z), prob.softcap), teacher, labels, prob.div)
                if weights:
                    total = ce * (weights[1] * prob.scale) + (0.0 if kd is None else kd * (weights[0] * prob.scale))
                    (g,) = torch.autograd.grad(total, z)
        if kd is not None:
            kd_sum += kd.detach()
        ce_sum += ce.detach()
        if weights:
            g = g.to(dtype)
            grad_h.index_copy_(0, rows, (g @ w).to(hidden.dtype))
            if dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), h)
            else:  # low-precision matmul, accumulated in the weight's dtype (one [V, H] temporary per chunk)
                grad_w.add_(g.t() @ h)
    return kd_sum * prob.scale, ce_sum * prob.scale, grad_h, grad_w


def _closed_form(
    z: torch.Tensor, teacher: TeacherHead | None, labels: torch.Tensor, div: Divergence, weights: tuple[float, float]
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`_chunk_sums` of a chunk and the gradient of w_kd * kd + w_ce * ce w.r.t. its logits, without autograd.

    CE's gradient is softmax(z) - onehot(label), the divergence's its closed form (`per_token_divergence_and_grad`,
    divided by T); at T = 1 the two terms share one log-softmax of z. Autograd through `_chunk_sums` computes the
    same values and gradient with a second log-softmax, the CE's backward and the sum of the two gradients: three
    [n, V] passes and allocations more (benchmarks/README.md, "The fused loss's gradient in closed form").

    Args:
        z: [n, V] the chunk's student logits (the head's matmul dtype).
        teacher: the chunk's teacher rows, or None (CE only).
        labels: [n] target ids.
        div: the divergence.
        weights: (w_kd, w_ce), the normalizer already applied.

    Returns:
        (kd sum or None, ce sum, gradient [n, V] in z's dtype).
    """
    logits = _upcast(z)
    log_q = log_p = None
    if teacher is not None:
        log_q, log_p = log_probs(logits, teacher.logits(), div.temperature)
    shared = log_q is not None and div.temperature == 1.0 and log_q.dtype == logits.dtype
    ce_log_q = log_q if shared else torch.log_softmax(logits, dim=-1)
    ce = -ce_log_q.gather(1, labels.unsqueeze(1)).sum()
    kd = None
    if teacher is None:
        grad = ce_log_q.exp_().mul_(weights[1])
    else:
        q = ce_log_q.exp()  # before the divergence overwrites log_q (the same tensor at T = 1)
        kd_rows, dz = per_token_divergence_and_grad(log_q, log_p, div)
        kd = kd_rows.sum()
        grad = dz.mul_(weights[0] / div.temperature).add_(q, alpha=weights[1])
    grad[torch.arange(len(labels), device=labels.device), labels] -= weights[1]
    return kd, ce, grad.to(z.dtype)


def _proportion(actual: tuple[float, float], planned: tuple[float, float]) -> float | None:
    """lam with actual == lam * planned (both grads), or None when they are not proportional."""
    i = 0 if abs(planned[0]) >= abs(planned[1]) else 1
    if planned[i] == 0.0:
        return None
    lam = actual[i] / planned[i]
    j = 1 - i
    ok = math.isclose(actual[j], lam * planned[j], rel_tol=1e-6, abs_tol=1e-12 * abs(actual[i]))
    return lam if ok else None


class PlannedHeadLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], problem, loss_weights) -> (kd, ce) scalars of a loss on chunks of a head.

    `problem.run(hidden, weight, weights, dtype)` walks the chunks once and returns (kd, ce, grad_hidden,
    grad_weight): the two scaled sums and, when `weights` = (w_kd, w_ce) is given, the gradients of
    w_kd * kd + w_ce * ce (else None); the head's matmuls run in `dtype`. With `loss_weights` the gradient is
    computed in the forward and scaled in the backward; otherwise (or when the actual grads are not proportional
    to them) the backward runs the chunks again (module doc). Used by the fused loss and the cross-tokenizer one
    (`losses.align`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, prob, loss_weights):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        eager = loss_weights if needs_grad and loss_weights is not None else None
        ctx.dtype = _compute_dtype(hidden, weight)  # backward runs outside autocast: keep the forward's dtype
        # the head's matmuls take ctx.dtype explicitly; the rest runs as the recomputing backward does (autocast off),
        # so the planned gradient and values do not depend on autocast's casts of the loss's own small matmuls
        with torch.autocast(hidden.device.type, enabled=False):
            kd, ce, grad_h, grad_w = prob.run(hidden, weight, eager, ctx.dtype)
        ctx.prob, ctx.planned = prob, eager
        # The precomputed grads are plain attributes, not saved tensors: backward scales them in place, and a
        # saved tensor modified in place would break a second backward through a retained graph.
        ctx.grads = (grad_h, grad_w)
        ctx.save_for_backward(hidden, weight)
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        hidden, weight = ctx.saved_tensors
        actual = (float(g_kd), float(g_ce))
        lam = None if ctx.planned is None else _proportion(actual, ctx.planned)
        (grad_h, grad_w), ctx.grads = ctx.grads, (None, None)
        ctx.planned = None  # the kept grads are handed out (and scaled in place) once; a retained graph recomputes
        if lam is None:
            _, _, grad_h, grad_w = ctx.prob.run(hidden, weight, actual, ctx.dtype)
        else:
            grad_h, grad_w = grad_h.mul_(lam), grad_w.mul_(lam)  # in place: no second [V, H] buffer
        return grad_h, grad_w.to(weight.dtype), None, None


def fused_kd_terms(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    div: Divergence,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    loss_weights: tuple[float, float] | None = None,
) -> KDTerms:
    """KD and CE terms of a causal LM from its hidden states, never materializing [N, V] logits.

    Same values and gradients as `kd_terms` on the full logits (inputs here are already shifted).

    Args:
        student_hidden: [N, H] final hidden states (after the final norm), row i predicts labels[i].
        student_head_weight: [V, H] output head (`model.get_output_embeddings().weight`).
        teacher: `TeacherHead` ([N, Ht] hidden + [V, Ht] head), `SparseTargets` ([N, k]), or None (CE only).
        labels: [N] next-token ids, -100 = no loss (only masked-in rows are computed).
        div: the divergence (name, parameters, temperature, sparse_tail).
        num_tokens: normalizer (the global unmasked count across accumulation/ranks); default: this batch's.
        chunk_size: tokens per chunk; default `default_chunk_size(V)`.
        softcap: student final logit softcapping (Gemma 2), or None.
        loss_weights: (w_kd, w_ce) the caller will multiply kd and ce by, e.g. (alpha * T^2, 1 - alpha):
            gradients are then computed in the forward (no recompute). Any other weighting stays exact.

    Returns:
        KDTerms(kd, ce, n_tokens): kd is None without a teacher; both 0 (finite grads) when all masked.
    """
    if isinstance(teacher, SparseTargets):
        check_temperature(teacher, div)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    denom = rows.numel() if num_tokens is None else num_tokens
    prob = _Problem(
        teacher=None if teacher is None else teacher.rows(rows),
        labels=labels[rows],
        rows=rows,
        div=div,
        scale=1.0 / max(float(denom), 1.0),
        chunk_size=chunk_size or default_chunk_size(student_head_weight.shape[0]),
        softcap=softcap,
    )
    if not torch.is_grad_enabled():
        loss_weights = None  # evaluation: no gradient to compute ahead
    elif teacher is None and loss_weights is not None:
        loss_weights = (0.0, loss_weights[1])  # kd does not exist: its (zero) grad must not break the plan
    kd, ce = PlannedHeadLoss.apply(student_hidden, student_head_weight, prob, loss_weights)
    return KDTerms(kd=None if teacher is None else kd, ce=ce, n_tokens=rows.numel())
