"""Policy-gradient reverse KL (`potstill.losses.policy`) against closed forms, by enumerating every sample."""

from __future__ import annotations

import itertools

import pytest
import torch

from potstill.losses.policy import importance_weights, minillm_surrogate, sampled_reverse_kl

V = 3  # vocabulary of the toy problems


def _toy(seed: int = 0):
    """A two-step toy: student logits z1 [V], z2 [V, V] (second step given the first token), teacher the same."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((V,), (V, V)))
    p1 = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    p2 = torch.log_softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    return z1, z2, p1, p2


def _exact_sequence_kl(z1, z2, p1, p2) -> torch.Tensor:
    """KL(q || p) over the V^2 two-token sequences."""
    q1, q2 = torch.log_softmax(z1, -1), torch.log_softmax(z2, -1)
    pairs = itertools.product(range(V), range(V))
    return sum((q1[a] + q2[a, b]).exp() * (q1[a] + q2[a, b] - p1[a] - p2[a, b]) for a, b in pairs)


def test_sampled_reverse_kl_with_any_constant_baseline_keeps_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(7, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    log_q = torch.log_softmax(z, -1)
    exact = (log_q.exp() * (log_q - log_p)).sum()
    (g_exact,) = torch.autograd.grad(exact, z, retain_graph=True)
    for b in (0.0, 0.7, -2.0):
        surrogate, advantage = sampled_reverse_kl(log_q, log_p, b)
        expected = (log_q.exp().detach() * surrogate).sum()
        (g,) = torch.autograd.grad(expected, z, retain_graph=True)
        torch.testing.assert_close(expected, exact.detach())
        torch.testing.assert_close(g, g_exact)
        torch.testing.assert_close(advantage, (log_q - log_p).detach() - b)
    _, centered = sampled_reverse_kl(log_q, log_p, "batch")
    assert abs(centered.mean().item()) < 1e-12 and centered.std() > 0.1


def _minillm_expectation(z1, z2, p1, p2, single_step: bool, mix: float = 0.0):
    """E over all V^2 sequences (each weighted by its sampling probability under mix p + (1 - mix) q) of the
    MiniLLM surrogate summed over the sequence, with length_norm off."""
    q1, q2 = torch.log_softmax(z1, -1), torch.log_softmax(z2, -1)
    seqs = list(itertools.product(range(V), range(V)))
    a, b = torch.tensor([s[0] for s in seqs]), torch.tensor([s[1] for s in seqs])
    log_q = torch.stack([q1[a], q2[a, b]], dim=1)  # [V^2, 2]
    log_p = torch.stack([p1[a], p2[a, b]], dim=1)
    kl1 = (q1.exp() * (q1 - p1)).sum()
    kl2 = (q2.exp() * (q2 - p2)).sum(-1)  # [V]: step 2's KL given the first token
    token_rkl = torch.stack([kl1.expand(len(seqs)), kl2[a]], dim=1) if single_step else None
    mask = torch.ones_like(log_q, dtype=torch.bool)
    surrogate, _ = minillm_surrogate(log_q, log_p, mask, token_rkl, mix=mix, length_norm=False)
    sampler = (mix * log_p.exp() + (1 - mix) * log_q.exp()).detach().prod(dim=1)  # [V^2]
    return (sampler * surrogate.sum(dim=1)).sum()


@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_expectation_is_the_sequence_kl_and_its_gradient(single_step):
    z1, z2, p1, p2 = _toy()
    exact = _exact_sequence_kl(z1, z2, p1, p2)
    g_exact = torch.autograd.grad(exact, (z1, z2))
    expected = _minillm_expectation(z1, z2, p1, p2, single_step)
    g = torch.autograd.grad(expected, (z1, z2))
    torch.testing.assert_close(expected, exact.detach())
    for got, want in zip(g, g_exact, strict=True):
        torch.testing.assert_close(got, want)
    assert exact.item() > 0.1 and g_exact[1].abs().max() > 0.01  # not trivially 0 == 0


def test_minillm_one_step_teacher_mixed_sampling_is_unbiased_with_its_importance_weights():
    """One token: the per-token weight q / mixture is the exact importance weight (no clip): same value and
    gradient as sampling from the student."""
    z1, _, p1, _ = _toy(1)
    q1 = torch.log_softmax(z1, -1)
    exact = (q1.exp() * (q1 - p1)).sum()
    g_exact = torch.autograd.grad(exact, z1, retain_graph=True)
    log_q, log_p, mask = q1[:, None], p1[:, None], torch.ones(V, 1, dtype=torch.bool)
    for single_step in (True, False):
        kl = exact.expand(V)[:, None] if single_step else None
        surrogate, _ = minillm_surrogate(log_q, log_p, mask, kl, mix=0.4)
        sampler = (0.4 * p1.exp() + 0.6 * q1.exp()).detach()
        expected = (sampler * surrogate[:, 0]).sum()
        torch.testing.assert_close(expected, exact.detach())
        torch.testing.assert_close(torch.autograd.grad(expected, z1, retain_graph=True), g_exact)
    biased, _ = minillm_surrogate(log_q, log_p, mask, mix=0.4, clip=1.0)  # clipped weights are not exact any more
    assert (importance_weights(log_q, log_p, 0.4, 1.0) <= 1.0).all()
    assert not torch.allclose((sampler * biased[:, 0]).sum(), exact.detach())


def test_importance_weights_are_at_most_one_over_one_minus_mix():
    log_q = torch.log_softmax(torch.randn(50, 9, dtype=torch.float64), -1)
    log_p = torch.log_softmax(3 * torch.randn(50, 9, dtype=torch.float64), -1)
    w = importance_weights(log_q, log_p, 0.2, float("inf"))
    assert (w <= 1 / 0.8 + 1e-12).all() and w.min() < 0.5
    torch.testing.assert_close(importance_weights(log_q, log_p, 0.0, 5.0), torch.ones_like(w))


def test_minillm_length_normalized_advantage_is_minus_the_mean_future_reward():
    """Row 0 scores positions 1..3, row 1 positions 0..1; rewards r = log p - log q."""
    log_q = torch.log(torch.tensor([[0.5, 0.5, 0.25, 0.5], [0.5, 0.25, 0.5, 0.5]]))
    log_p = torch.log(torch.tensor([[0.5, 0.25, 0.5, 0.125], [0.125, 0.5, 0.5, 0.5]]))
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    r = (log_p - log_q) * mask
    _, a_single = minillm_surrogate(log_q, log_p, mask, torch.zeros_like(log_q))
    want = torch.tensor([[0.0, -(r[0, 2] + r[0, 3]) / 2, -r[0, 3], 0.0], [-r[1, 1], 0.0, 0.0, 0.0]])
    torch.testing.assert_close(a_single, want)
    _, a_full = minillm_surrogate(log_q, log_p, mask, length_norm=True)
    want = torch.tensor(
        [[0.0, -r[0, 1:].sum() / 3, -r[0, 2:].sum() / 2, -r[0, 3]], [-r[1, :2].sum() / 2, -r[1, 1], 0, 0]]
    )
    torch.testing.assert_close(a_full, want)
    _, centered = minillm_surrogate(log_q, log_p, mask, length_norm=True, baseline="batch")
    assert abs(centered[mask].mean().item()) < 1e-6 and (centered[~mask] == 0).all()
