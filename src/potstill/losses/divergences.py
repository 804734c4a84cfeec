"""Per-token divergences between a teacher (p) and a student (q) next-token distribution.

Every function takes student and teacher logits `[N, V]` (any leading dims; order `(student, teacher)`),
applies the temperature to both (`softmax(logits / T)`), and returns `[N]`: the divergence of each
token, summed over the vocabulary. Everything is computed from `log_softmax` in float32 (float64 when
an input is float64; bf16/fp16 inputs are upcast), and mixtures such as `beta*p + (1-beta)*q` are
formed in log space with `logaddexp`, so a probability that underflows to 0 never produces `log(0)`.

Formulas (p = teacher, q = student, sums over the vocabulary):

- fkl: KL(p||q) = sum p log(p/q)
- rkl: KL(q||p) = sum q log(q/p)
- tvd: 1/2 sum |p - q|, in [0, 1]
- jsd(beta): m = beta p + (1-beta) q; beta KL(p||m) + (1-beta) KL(q||m). beta = 0 is exactly fkl and
  beta = 1 exactly rkl (TRL's `generalized_jsd_loss` convention), although the formula tends to 0 at both
  ends. `scaled=True` divides by beta (1-beta), which tends to fkl / rkl, so it is continuous in beta.
- skl(skew): KL(p || skew p + (1-skew) q)        (DistiLLM; skew = 0 is fkl)
- srkl(skew): KL(q || (1-skew) p + skew q)       (DistiLLM; skew = 0 is rkl)
- akl(mu): w_head fkl + w_tail rkl, weights from the teacher's head/tail gaps (Wu et al. 2024), see `akl`.

Gradients. In distillation only the student learns, so when the student logits need a gradient and
the teacher's do not, the gradient with respect to the student logits is computed in closed form in
the forward pass (one [N, V] tensor kept for backward) instead of recording autograd's chain of
[N, V] intermediates: about half the time and a fraction of the memory (benchmarks/README.md). Each
divergence is written once as `_parts(log_q, log_p, with_grad) -> (value, dD/dz)`, z = logits / T;
when the teacher also needs a gradient the same value formula simply runs under autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# (value [N], dD/dz [N, V] or None): z = student logits / T.
Parts = tuple[torch.Tensor, torch.Tensor | None]
PartsFn = Callable[[torch.Tensor, torch.Tensor, bool], Parts]


def log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> tuple:
    """Tempered log-probabilities of both models in the computation dtype.

    Args:
        student_logits: [N, V] logits (any float dtype).
        teacher_logits: [N, V] logits.
        temperature: T > 0.

    Returns:
        (log q, log p), each [N, V], float64 if either input is float64, else float32.
    """
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    log_q = torch.log_softmax(_tempered(student_logits.to(dtype), temperature), dim=-1)
    log_p = torch.log_softmax(_tempered(teacher_logits.to(dtype), temperature), dim=-1)
    return log_q, log_p


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T; at T = 1 the logits themselves (x / 1 == x exactly): a [N, V] float32 pass and allocation less,
    three per chunk of the fused loss (benchmarks/README.md, "The demo's step, part by part")."""
    return logits if temperature == 1.0 else logits / temperature


class _StudentGrad(torch.autograd.Function):
    """A divergence whose gradient w.r.t. the student logits is computed in closed form during forward."""

    @staticmethod
    def forward(
        ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, parts: PartsFn
    ) -> torch.Tensor:
        value, dz = parts(*log_probs(student_logits, teacher_logits, temperature), True)
        ctx.student_dtype = student_logits.dtype
        ctx.save_for_backward(dz if temperature == 1.0 else dz.div_(temperature))
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return (grad * grad_value.unsqueeze(-1)).to(ctx.student_dtype), None, None, None


def _divergence(
    parts: PartsFn, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Run `parts` on [N, V] logits -> [N], with the closed-form student gradient when only the student learns."""
    if torch.is_grad_enabled() and student_logits.requires_grad and not teacher_logits.requires_grad:
        return _StudentGrad.apply(student_logits, teacher_logits, temperature, parts)
    value, _ = parts(*log_probs(student_logits, teacher_logits, temperature), False)
    return value


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row without the [..., V] product (a batched GEMV). [..., V] x2 -> [...]."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).view(a.shape[:-1])


def _softmax_vjp_(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dD/dz from g = dD/dq through q = softmax(z): q * (g - <q, g>), in g's storage. [N, V] x2 -> [N, V]."""
    return g.sub_(_rowdot(q, g).unsqueeze(-1)).mul_(q)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float, with_grad: bool) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b) from log-probs, exact (no log(0)) at weight 0 and 1.

    With `with_grad` (outside autograd) the result is written into its first temporary (one [N, V] less).
    """
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    first, second = log_a + math.log(weight), log_b + math.log1p(-weight)
    return torch.logaddexp(first, second, out=first) if with_grad else torch.logaddexp(first, second)


# The parts functions own their log-prob inputs. With `with_grad` they run outside autograd (inside
# _StudentGrad.forward) and overwrite them in place: on CPU a fresh [N, V] tensor costs more than the
# arithmetic (page faults), so the closed-form path allocates as few as it can. Without `with_grad`
# they use out-of-place, differentiable ops only.


def _fkl_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool) -> Parts:
    p = log_p.exp()
    if not with_grad:
        return _rowdot(p, log_p - log_q), None
    value = _rowdot(p, log_p.sub_(log_q))
    return value, log_q.exp_().sub_(p)


def _rkl_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool) -> Parts:
    q = log_q.exp()
    if not with_grad:
        return _rowdot(q, log_q - log_p), None
    log_ratio = log_q.sub_(log_p)
    value = _rowdot(q, log_ratio)
    # dD/dq = log(q/p) + 1; the softmax VJP drops the constant and <q, log(q/p)> is the value itself.
    return value, log_ratio.sub_(value.unsqueeze(-1)).mul_(q)


def _tvd_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool) -> Parts:
    if not with_grad:
        return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1), None
    q, diff = log_q.exp_(), log_p.exp_().sub_(log_q)  # diff = p - q
    value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    return value, _softmax_vjp_(q, diff.sign_().mul_(-0.5))


def _jsd_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool, beta: float, scaled: bool) -> Parts:
    if beta in (0.0, 1.0):
        return (_fkl_parts if beta == 0.0 else _rkl_parts)(log_q, log_p, with_grad)
    scale = 1.0 / (beta * (1.0 - beta)) if scaled else 1.0
    log_m = _log_mix(log_p, log_q, beta, with_grad)
    if not with_grad:
        kl_pm = _rowdot(log_p.exp(), log_p - log_m)
        kl_qm = _rowdot(log_q.exp(), log_q - log_m)
        return (beta * kl_pm + (1.0 - beta) * kl_qm) * scale, None
    kl_pm = _rowdot(log_p.exp(), log_p.sub_(log_m))
    q = torch.exp(log_q, out=log_p)
    kl_qm = _rowdot(q, log_q.sub_(log_m))
    # dD/dq = (1 - beta) log(q/m): the terms from m's dependence on q cancel.
    return (beta * kl_pm + (1.0 - beta) * kl_qm) * scale, _softmax_vjp_(q, log_q.mul_((1.0 - beta) * scale))


def _skl_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool, skew: float) -> Parts:
    if skew == 0.0:  # also avoids p/q, which the gradient below would form at skew = 0
        return _fkl_parts(log_q, log_p, with_grad)
    log_m = _log_mix(log_p, log_q, skew, with_grad)
    if not with_grad:
        return _rowdot(log_p.exp(), log_p - log_m), None
    value = _rowdot(log_p.exp(), log_p.sub_(log_m))
    # dD/dq = -(1 - skew) p/m, with p/m <= 1/skew.
    return value, _softmax_vjp_(log_q.exp_(), log_p.exp_().mul_(skew - 1.0))


def _srkl_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool, skew: float) -> Parts:
    if skew == 0.0:  # also avoids q/p, which the gradient below would form at skew = 0
        return _rkl_parts(log_q, log_p, with_grad)
    log_m = _log_mix(log_p, log_q, 1.0 - skew, with_grad)
    q = log_q.exp()
    if not with_grad:
        return _rowdot(q, log_q - log_m), None
    log_ratio = log_q.sub_(log_m)
    value = _rowdot(q, log_ratio)
    # dD/dq = log(q/m) + 1 - skew q/m, with q/m <= 1/skew (the constant 1 drops out).
    return value, _softmax_vjp_(q, log_ratio.sub_(torch.exp(log_ratio, out=log_m).mul_(skew)))


def akl_head_mask(teacher_probs: torch.Tensor, mu: float) -> torch.Tensor:
    """The teacher's head: its most probable tokens, up to and including the one where their mass reaches mu.

    A token is in the head when the teacher mass of the tokens ranked strictly above it is < mu, so the
    top token is always in the head for mu > 0, the head is empty at mu = 0 and the whole vocabulary at
    mu = 1. At mu = 0.5 this is the complement of DSKD's tail (ascending cumulative mass < mu) except on
    exact ties. Ties at the boundary value all join the head.

    Args:
        teacher_probs: [N, V] probabilities.
        mu: head mass in [0, 1].

    Returns:
        [N, V] bool mask.
    """
    sorted_p = teacher_probs.sort(dim=-1, descending=True).values
    mass_above = sorted_p.cumsum(-1).sub_(sorted_p)
    # Number of head tokens per row, then the probability of the last one as a threshold: comparing
    # values avoids scattering the sorted mask back through the permutation.
    n_head = (mass_above < mu).sum(-1, keepdim=True)
    del mass_above
    threshold = sorted_p.gather(-1, (n_head - 1).clamp_min(0))
    return (teacher_probs >= threshold) & (n_head > 0)


def _akl_parts(log_q: torch.Tensor, log_p: torch.Tensor, with_grad: bool, mu: float) -> Parts:
    p, q = log_p.exp(), log_q.exp()
    with torch.no_grad():
        gap = (p - q).abs_()
        g_total = gap.sum(-1).clamp_min(torch.finfo(gap.dtype).tiny)
        w_head = gap.masked_fill_(akl_head_mask(p, mu).logical_not_(), 0.0).sum(-1).div_(g_total)
        del gap
    log_ratio = log_q.sub_(log_p) if with_grad else log_q - log_p  # log(q/p)
    fkl_value, rkl_value = -_rowdot(p, log_ratio), _rowdot(q, log_ratio)
    value = w_head * fkl_value + (1.0 - w_head) * rkl_value
    if not with_grad:
        return value, None
    # w (q - p) + (1 - w) q (log(q/p) - rkl): fkl's and rkl's closed forms, weights held fixed.
    w = w_head.unsqueeze(-1)
    dz = log_ratio.sub_(rkl_value.unsqueeze(-1)).mul_(q).mul_(1.0 - w)
    return value, dz.add_(q.sub_(p).mul_(w))


def fkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p||q), mass-covering. [N, V] x2 -> [N]."""
    return _divergence(_fkl_parts, student_logits, teacher_logits, temperature)


def rkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(q||p), mode-seeking. [N, V] x2 -> [N]."""
    return _divergence(_rkl_parts, student_logits, teacher_logits, temperature)


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance 1/2 sum |p - q| in [0, 1]. [N, V] x2 -> [N]."""
    return _divergence(_tvd_parts, student_logits, teacher_logits, temperature)


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    scaled: bool = False,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, TRL's convention. [N, V] x2 -> [N].

    Args:
        student_logits: [N, V].
        teacher_logits: [N, V].
        temperature: T > 0.
        beta: weight of the teacher in the mixture m = beta p + (1-beta) q; 0 -> fkl, 1 -> rkl exactly.
        scaled: divide by beta (1-beta), so the value tends to fkl (beta -> 0) and rkl (beta -> 1).

    Returns:
        [N] beta KL(p||m) + (1-beta) KL(q||m) (divided by beta (1-beta) when scaled).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    return _divergence(partial(_jsd_parts, beta=beta, scaled=scaled), student_logits, teacher_logits, temperature)


def skl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, skew: float = 0.1
) -> torch.Tensor:
    """Skew forward KL(p || skew p + (1-skew) q) (DistiLLM); skew = 0 is fkl. [N, V] x2 -> [N]."""
    return _divergence(partial(_skl_parts, skew=skew), student_logits, teacher_logits, temperature)


def srkl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, skew: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL(q || (1-skew) p + skew q) (DistiLLM); skew = 0 is rkl. [N, V] x2 -> [N]."""
    return _divergence(partial(_srkl_parts, skew=skew), student_logits, teacher_logits, temperature)


def akl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, mu: float = 0.5
) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024): fkl and rkl weighted by where the student misses the teacher.

    g_head = sum_head |p - q| and g_tail = sum_tail |p - q| (head from `akl_head_mask`, both detached);
    AKL = g_head / (g_head + g_tail) fkl + g_tail / (g_head + g_tail) rkl. When p = q both gaps are 0 and
    the value is 0.

    Args:
        student_logits: [N, V].
        teacher_logits: [N, V].
        temperature: T > 0.
        mu: head mass in [0, 1] (paper: 0.5).

    Returns:
        [N] adaptive KL.
    """
    return _divergence(partial(_akl_parts, mu=mu), student_logits, teacher_logits, temperature)


_PARTS: dict[Callable, Callable[..., Parts]] = {
    fkl: _fkl_parts,
    rkl: _rkl_parts,
    tvd: _tvd_parts,
    jsd: _jsd_parts,
    skl: _skl_parts,
    srkl: _srkl_parts,
    akl: _akl_parts,
}


def value_and_grad(fn: Callable, log_q: torch.Tensor, log_p: torch.Tensor, **params) -> Parts:
    """A divergence of this module on tempered log-probabilities, with its gradient in closed form.

    For a caller that has log q already and computes its own gradient (the fused loss shares log q with its CE
    term at T = 1 instead of taking a second log-softmax); the values and gradient are those `fn` gives.

    Args:
        fn: one of `fkl`, `rkl`, `tvd`, `jsd`, `skl`, `srkl`, `akl`.
        log_q: [N, V] student log-probabilities log softmax(z), z = logits / T; overwritten.
        log_p: [N, V] teacher log-probabilities at the same T; overwritten.
        params: `fn`'s parameters (beta, scaled, skew, mu).

    Returns:
        (value [N], dD/dz [N, V]); divide the gradient by T for the one w.r.t. the logits.
    """
    return _PARTS[fn](log_q, log_p, True, **params)
