"""Reverse KL on the student's own samples, by policy gradient (on-policy distillation).

On a completion y sampled from the student q, the sampled reverse KL is `sum_t log q(y_t) - log p(y_t)`
(p = teacher), an unbiased estimate of KL(q || p) per token. Its gradient through the sampling is the
policy gradient `sum_t a_t grad log q(y_t)` with the per-token reward `-a_t = log p(y_t) - log q(y_t)` held
fixed (the score-function term `E_q[grad log q] = 0`): the form Qwen3 and Thinking Machines (2025) used for
"on-policy distillation". The teacher is consulted only at the tokens the student wrote, never over its
vocabulary.
"""

from __future__ import annotations

import torch


def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token surrogate whose value is `log q - log p` and whose gradient is `(log q - log p) grad log q`.

    Args:
        student_logprobs: [n] log q(y_t) of the sampled tokens (differentiable).
        teacher_logprobs: [n] log p(y_t) of the same tokens (no gradient needed).

    Returns:
        [n] float: summed and divided by the token count, its value is the sampled reverse KL and its
        gradient the policy gradient of it.
    """
    advantage = (student_logprobs - teacher_logprobs).detach()
    return advantage + advantage * (student_logprobs - student_logprobs.detach())
