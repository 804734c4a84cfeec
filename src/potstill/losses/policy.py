"""Reverse KL on the student's own samples, by policy gradient (on-policy distillation).

On a completion y sampled from the student q, the sampled reverse KL is `sum_t log q(y_t) - log p(y_t)`
(p = teacher), an unbiased estimate of KL(q || p). Its gradient through the sampling is a policy gradient
`sum_t A_t grad log q(y_t)`, where the advantage A_t is built from the per-token rewards
`r_t = log p(y_t) - log q(y_t)` held fixed (the score-function term `E_q[grad log q] = 0`).

- `sampled_reverse_kl`: A_t = -r_t (minus a baseline b): each token is graded on its own, the form Qwen3 and
  Thinking Machines (2025) used for "on-policy distillation". The teacher is consulted only at the tokens the
  student wrote. Any b that does not depend on the token it multiplies keeps the gradient unbiased and can
  only change its variance.
- `minillm_surrogate`: MiniLLM (Gu et al. 2024): the sequence-level reward `R_t = sum_{t' >= t} r_t'`, optionally
  length-normalized (the mean of the future rewards instead of their sum), the single-step decomposition (the
  reward of step t itself replaced by the exact reverse KL over the vocabulary at t, differentiated in closed form,
  leaving only the future rewards `R_{t+1}` to the policy gradient), and per-token importance weights
  `w_t = q(y_t) / p_mix(y_t)`, clipped, for samples drawn from the teacher-mixed `p_mix = mix p + (1 - mix) q`.
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = float | torch.Tensor | Literal["batch"]


def sampled_reverse_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, baseline: Baseline = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token surrogate whose value is `log q - log p` and whose gradient is `(log q - log p - b) grad log q`.

    Args:
        student_logprobs: [n] log q(y_t) of the sampled tokens (differentiable).
        teacher_logprobs: [n] log p(y_t) of the same tokens (no gradient needed).
        baseline: b, subtracted from the advantage `log q - log p` in the gradient only: a number (0 = none) or
            "batch", the mean advantage of these n tokens.

    Returns:
        (surrogate [n]: summed and divided by the token count, its value is the sampled reverse KL and its
        gradient the policy gradient of it; the advantage minus b [n], detached).
    """
    value = (student_logprobs - teacher_logprobs).detach()
    advantage = value - _baseline_of(baseline, value, torch.ones_like(value))
    return value + advantage * (student_logprobs - student_logprobs.detach()), advantage


def _baseline_of(baseline: Baseline, advantage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | float:
    """The number to subtract: `baseline` itself, or with "batch" the mean of `advantage` over `mask`."""
    if isinstance(baseline, str):
        return (advantage * mask).sum() / mask.sum().clamp_min(1)
    return baseline


def importance_weights(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mix: float, clip: float
) -> torch.Tensor:
    """MiniLLM's per-token weights `min(q / (mix p + (1 - mix) q), clip)` of tokens sampled from the mixture.

    Args:
        student_logprobs, teacher_logprobs: [...] log q(y_t), log p(y_t).
        mix: the teacher's share of the sampling distribution in [0, 1] (0: all weights are 1).
        clip: the largest weight (> 0).

    Returns:
        [...] detached weights. Without the clip they are at most 1 / (1 - mix).
    """
    log_q, log_p = student_logprobs.detach(), teacher_logprobs.detach()
    share = torch.tensor(mix, dtype=log_q.dtype, device=log_q.device)
    log_mix = torch.logaddexp(log_p + share.log(), log_q + torch.log1p(-share))  # mix 0: log q, weights 1
    return torch.exp(log_q - log_mix).clamp_max(clip)


def minillm_surrogate(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    token_rkl: torch.Tensor | None = None,
    mix: float = 0.0,
    clip: float = float("inf"),
    length_norm: bool = True,
    baseline: Baseline = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLLM's sequence-level reverse-KL policy gradient, as a per-token surrogate loss.

    With rewards r_t = log p(y_t) - log q(y_t) over the completion (positions where `mask` is true, in order):

    - single step (`token_rkl` given): the term of step t is `w_t KL_t(q || p)` (exact, differentiable over the
      vocabulary) plus the policy gradient `w_t A_t grad log q(y_t)` with `A_t = -R_{t+1}` (future rewards only);
    - otherwise: value `w_t (log q(y_t) - log p(y_t))`, gradient `w_t A_t grad log q(y_t)` with `A_t = -R_t`.

    `R` is the sum of the rewards from that step to the end of the completion, or their mean with `length_norm`
    (0 when nothing is left). `baseline` is subtracted from A_t. Without length normalization, mixing or clipping,
    the expected surrogate over the student's samples is exactly the sequence-level KL(q || p) and its gradient.

    Args:
        student_logprobs: [B, T] log q(y_t) of the sampled tokens (differentiable).
        teacher_logprobs: [B, T] log p(y_t).
        mask: [B, T] bool, the completion's tokens.
        token_rkl: [B, T] KL(q(.|y_<t) || p(.|y_<t)) at each position (differentiable), or None.
        mix, clip: `importance_weights` (the samples came from mix p + (1 - mix) q).
        length_norm: normalize the future reward by the number of future tokens.
        baseline: subtracted from the advantage: a number, or "batch" (the mean advantage over `mask`).

    Returns:
        (surrogate [B, T], zero off the mask; advantage A_t - baseline [B, T], detached, zero off the mask).
    """
    mask = mask.to(student_logprobs.dtype)
    log_q = student_logprobs
    reward = (teacher_logprobs - log_q).detach() * mask
    ahead = _reverse_cumsum(reward)  # R_t = sum_{t' >= t} r_t'
    left = _reverse_cumsum(mask)  # tokens from t to the end
    if token_rkl is not None:
        ahead, left = ahead - reward, left - mask  # R_{t+1}: the future only
    future = ahead / left.clamp_min(1) if length_norm else ahead
    weights = importance_weights(log_q, teacher_logprobs, mix, clip)
    advantage = -future * mask
    advantage = (advantage - _baseline_of(baseline, advantage, mask)) * mask
    value = token_rkl if token_rkl is not None else -reward
    surrogate = weights * (value + advantage * (log_q - log_q.detach()))
    return surrogate * mask, advantage


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: the sum of x[:, t:] at each t."""
    return x.flip(-1).cumsum(-1).flip(-1)
