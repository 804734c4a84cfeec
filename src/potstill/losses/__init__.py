"""The loss zoo: one explicit registry of divergences, and the KD objective built from it.

`LOSSES` maps a config name (`loss.name`) to a `LossSpec` (the per-token function, a one-line formula
for `potstill losses`, and the `Divergence` fields it reads). A `Divergence` is the divergence with its
parameters and temperature (plain values; `LossConfig.divergence` builds it from a config). `kd_terms` turns a
batch of student and teacher logits plus labels into the two normalized terms of the objective, and `combine`
weights them with `kd_weights`, the one place T^2 is applied:

    loss = alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)

`losses/` is pure math: it imports nothing of potstill outside itself (and `potstill.errors`). Labels follow the
HF convention (unshifted, `IGNORE_INDEX` = -100 carries no loss); `scored_mask` says which positions count.

Normalization (DESIGN.md section 3): each term is a sum over unmasked tokens divided once by
`num_tokens`, the global count of unmasked tokens across gradient accumulation and ranks, so
splitting a batch never changes the loss or its gradient. An all-masked batch gives 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.losses import divergences

IGNORE_INDEX = -100  # labels that carry no loss (the HF / PyTorch convention)

# Divergence field -> keyword argument of the divergence functions.
_KWARGS = {"beta": "beta", "jsd_scaled": "scaled", "skew": "skew", "akl_mu": "mu"}


@dataclass(frozen=True)
class LossSpec:
    """One divergence of the registry.

    Attributes:
        fn: per-token divergence `fn(student_logits [N, V], teacher_logits [N, V], temperature, **params) -> [N]`.
        formula: one line for `potstill losses` and the docs.
        params: names of the `Divergence` fields it uses (besides `temperature`).
    """

    fn: Callable[..., torch.Tensor]
    formula: str
    params: tuple[str, ...] = ()


LOSSES: dict[str, LossSpec] = {
    "fkl": LossSpec(divergences.fkl, "KL(p||q) = sum_v p log(p/q)  (forward, mass-covering)"),
    "rkl": LossSpec(divergences.rkl, "KL(q||p) = sum_v q log(q/p)  (reverse, mode-seeking)"),
    "jsd": LossSpec(
        divergences.jsd,
        "beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; beta=0: fkl, beta=1: rkl (TRL);"
        " jsd_scaled: / beta(1-beta)",
        ("beta", "jsd_scaled"),
    ),
    "tvd": LossSpec(divergences.tvd, "1/2 sum_v |p - q|  (total variation, in [0, 1])"),
    "skl": LossSpec(divergences.skl, "KL(p || skew p + (1-skew) q)  (DistiLLM skew forward KL)", ("skew",)),
    "srkl": LossSpec(divergences.srkl, "KL(q || (1-skew) p + skew q)  (DistiLLM skew reverse KL)", ("skew",)),
    "akl": LossSpec(
        divergences.akl,
        "g_head/(g_head+g_tail) fkl + g_tail/(g_head+g_tail) rkl, g = sum |p-q| on the teacher's top-mass akl_mu head"
        " / the rest",
        ("akl_mu",),
    ),
}


@dataclass(frozen=True)
class Divergence:
    """A divergence of the zoo with its parameters, at temperature T (both distributions are softmax(logits / T)).

    Attributes:
        name: a key of `LOSSES`.
        temperature: T > 0.
        beta: jsd interpolation in [0, 1].
        jsd_scaled: jsd / (beta (1 - beta)).
        skew: skl / srkl skew in [0, 1].
        akl_mu: akl head mass in [0, 1].
        sparse_tail: top-k teacher targets: "bucket" (k ids + one bucket for the rest) or "renorm" (k ids only).
    """

    name: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    jsd_scaled: bool = False
    skew: float = 0.1
    akl_mu: float = 0.5
    sparse_tail: str = "bucket"


def scored_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which positions are scored: position t predicts label t + 1, so `labels[:, 1:] != IGNORE_INDEX`.

    Args:
        labels: [B, T] unshifted labels.

    Returns:
        [B, T - 1] bool; its sum is the token count the objective divides by.
    """
    return labels[:, 1:] != IGNORE_INDEX


def kd_weights(alpha: float, temperature: float) -> tuple[float, float]:
    """The weights (alpha * T^2, 1 - alpha) of the KD and CE terms.

    T^2 keeps the soft term's gradient scale independent of T (it shrinks as 1/T^2; Hinton et al. 2015).
    """
    return alpha * temperature**2, 1.0 - alpha


@dataclass
class KDTerms:
    """The two terms of the KD objective for one (micro-)batch, each already divided by `num_tokens`.

    Attributes:
        kd: scalar divergence term (None when there is no teacher).
        ce: scalar hard-label cross-entropy at T = 1.
        n_tokens: unmasked (scored) tokens in this batch.
        hidden: scalar hidden-state term (`losses.hidden.hidden_term`), None when intermediate layers are not
            distilled.
        stats: figures of this batch to log beside the terms (cross-tokenizer KD: align ratio and coverage).
    """

    kd: torch.Tensor | None
    ce: torch.Tensor
    n_tokens: int
    hidden: torch.Tensor | None = None
    stats: dict[str, float] | None = None


def per_token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, div: Divergence) -> torch.Tensor:
    """The divergence `div.name` with its parameters and temperature.

    Args:
        student_logits: [N, V] logits.
        teacher_logits: [N, V] logits.
        div: the divergence.

    Returns:
        [N] divergence per token (float32; float64 for float64 input).
    """
    spec = LOSSES[div.name]
    kwargs = {_KWARGS[field]: getattr(div, field) for field in spec.params}
    return spec.fn(student_logits, teacher_logits, temperature=div.temperature, **kwargs)


def per_token_divergence_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, div: Divergence
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_divergence` from tempered log-probabilities, with its gradient in closed form
    (`divergences.value_and_grad`; log_q and log_p are overwritten).

    Args:
        log_q: [N, V] log softmax(student logits / T).
        log_p: [N, V] log softmax(teacher logits / T).
        div: the divergence (its temperature already applied to both).

    Returns:
        ([N] divergence per token, [N, V] its gradient w.r.t. the tempered student logits).
    """
    spec = LOSSES[div.name]
    kwargs = {_KWARGS[field]: getattr(div, field) for field in spec.params}
    return divergences.value_and_grad(spec.fn, log_q, log_p, **kwargs)


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which logit rows are scored, and their next-token targets.

    Position t of a [B, T] sequence predicts label t + 1, so row b*T + t of the flattened [B*T, V] logits
    is scored when labels[b, t + 1] != -100 (the last position of each sequence never is).

    Args:
        labels: [B, T] unshifted labels (HF convention, -100 = no loss).

    Returns:
        (rows, targets): [n] indices into the flattened [B*T] positions, and [n] their target ids.
    """
    scored = F.pad(scored_mask(labels), (0, 1), value=False).reshape(-1)
    rows = scored.nonzero().squeeze(-1)
    return rows, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)[rows]


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    div: Divergence,
    num_tokens: int | torch.Tensor | None = None,
) -> KDTerms:
    """Distillation and cross-entropy terms, summed over scored tokens and divided once by `num_tokens`.

    Only the scored rows are gathered (one copy of [n, V]); masked positions are never computed.

    Args:
        student_logits: [B, T, V] logits (bf16 is upcast inside).
        teacher_logits: [B, T, V] logits, or None for CE only.
        labels: [B, T] unshifted labels, -100 = no loss; shifted here.
        div: the divergence (name, parameters, temperature).
        num_tokens: the normalizer, e.g. the global unmasked count over grad accumulation and ranks;
            defaults to this batch's unmasked count. Counts below 1 are treated as 1 (all-masked -> 0).

    Returns:
        KDTerms(kd, ce, n_tokens); kd is None when teacher_logits is None.
    """
    rows, targets = shifted_targets(labels)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)[rows]
    denom = rows.numel() if num_tokens is None else num_tokens
    denom = torch.as_tensor(denom, device=student.device).clamp_min(1)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(student.to(dtype), targets, reduction="sum") / denom
    kd = None
    if teacher_logits is not None:
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[rows]
        kd = per_token_divergence(student, teacher, div).sum() / denom
    return KDTerms(kd=kd, ce=ce, n_tokens=rows.numel())


def combine(terms: KDTerms, alpha: float, temperature: float, hidden_weight: float = 0.0) -> torch.Tensor:
    """The KD objective alpha * T^2 * kd + (1 - alpha) * ce (weights from `kd_weights`), plus hidden_weight * hidden.

    alpha = 0 (and no hidden term) returns exactly `terms.ce` (no teacher needed).

    Args:
        terms: output of `kd_terms` (with `hidden` set when intermediate layers are distilled).
        alpha: weight of the KD term in [0, 1] (a resolved number, not 'auto').
        temperature: T of the divergence.
        hidden_weight: weight of the hidden-state term (used only when `terms.hidden` is set).

    Returns:
        Scalar loss.
    """
    if alpha == 0:
        loss = terms.ce
    elif terms.kd is None:
        raise ValueError(f"combine: alpha={alpha} needs a KD term, but kd_terms got no teacher logits")
    else:
        w_kd, w_ce = kd_weights(alpha, temperature)
        loss = w_kd * terms.kd + w_ce * terms.ce
    return loss if terms.hidden is None else loss + hidden_weight * terms.hidden
