"""Sparse (top-k) teacher targets: the builder, exactness at k = V, and the two views at k < V."""

from __future__ import annotations

import pytest
import torch

from potstill.config import LOSS_NAMES
from potstill.errors import UserError
from potstill.losses import Divergence, kd_terms, per_token_divergence
from potstill.losses.sparse import sparse_divergence, sparse_kd_terms, topk_targets

B, T, V = 2, 6, 17
F_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")  # f-divergences: coarse-graining lowers them


def _cfg(name: str, tail: str = "bucket", temperature: float = 1.5) -> Divergence:
    return Divergence(name=name, temperature=temperature, beta=0.3, skew=0.2, akl_mu=0.4, sparse_tail=tail)


def _logits(seed: int, shape=(B, T, V)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, shape[:2], generator=g)
    labels[0, 2] = labels[1, 4] = -100
    return student, teacher, labels


def test_topk_targets_builder():
    _, teacher, _ = _logits(0)
    targets = topk_targets(teacher, k=5, temperature=2.0)
    logp = torch.log_softmax(teacher / 2.0, dim=-1)
    assert targets.ids.shape == (B, T, 5) and targets.tail.shape == (B, T)
    assert (targets.logprobs[..., :-1] >= targets.logprobs[..., 1:]).all()  # most probable first
    assert (targets.ids[..., 0] == teacher.argmax(-1)).all()
    torch.testing.assert_close(targets.logprobs, logp.gather(-1, targets.ids))
    torch.testing.assert_close(targets.tail, 1 - targets.logprobs.exp().sum(-1))
    assert (topk_targets(teacher, k=V).tail == 0).all()


@pytest.mark.parametrize("k", [0, V + 1])
def test_topk_k_out_of_range(k):
    with pytest.raises(UserError, match=rf"k must be in \[1, {V}\].*got {k}"):
        topk_targets(torch.zeros(3, V), k=k)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_full_k_equals_dense(name, tail):
    """k = V: both views equal kd_terms on the teacher logits, value and gradient."""
    student, teacher, labels = _logits(1)
    cfg = _cfg(name, tail)
    sparse = sparse_kd_terms(student, topk_targets(teacher, V, cfg.temperature), labels, cfg, num_tokens=13)
    dense = kd_terms(student, teacher, labels, cfg, num_tokens=13)
    torch.testing.assert_close(sparse.kd, dense.kd)
    torch.testing.assert_close(sparse.ce, dense.ce)
    (g_sparse,) = torch.autograd.grad(sparse.kd + 0.3 * sparse.ce, student)
    (g_dense,) = torch.autograd.grad(dense.kd + 0.3 * dense.ce, student)
    torch.testing.assert_close(g_sparse, g_dense)


def _naive_fkl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def test_views_at_small_k_match_their_definition():
    """fkl on the renormalized view and on the k + 1 bucket view, against explicit float64 distributions."""
    student, teacher, _ = _logits(2, shape=(7, V))
    temperature, k = 1.5, 4
    targets = topk_targets(teacher, k, temperature)
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    p_k, q_k = p.gather(-1, targets.ids), q.gather(-1, targets.ids)
    renorm = _naive_fkl(p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True))
    bucket = _naive_fkl(
        torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1), torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    )
    torch.testing.assert_close(sparse_divergence(student, targets, _cfg("fkl", "renorm")), renorm)
    torch.testing.assert_close(sparse_divergence(student, targets, _cfg("fkl", "bucket")), bucket)


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_bucket_view_lower_bounds_the_dense_divergence(name):
    """Data-processing inequality: merging the tail into one bucket never raises an f-divergence."""
    student, teacher, _ = _logits(3, shape=(40, V))
    cfg = _cfg(name, "bucket")
    dense = per_token_divergence(student, teacher, cfg).detach()
    previous = torch.zeros(40, dtype=torch.float64)
    for k in (1, 3, 8, V):
        bucket = sparse_divergence(student, topk_targets(teacher, k, cfg.temperature), cfg).detach()
        assert (bucket <= dense + 1e-12).all()
        assert (bucket >= previous - 1e-12).all()  # top-k sets are nested: a finer partition, never lower
        previous = bucket
    assert (dense > 1e-3).all()
    torch.testing.assert_close(previous, dense)


def test_temperature_mismatch_is_a_user_error():
    student, teacher, labels = _logits(4)
    with pytest.raises(UserError, match="loss.temperature.*built at temperature 1.0"):
        sparse_kd_terms(student, topk_targets(teacher, 3, 1.0), labels, _cfg("fkl", temperature=2.0))


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_all_masked_is_zero(tail):
    student, teacher, _ = _logits(5)
    labels = torch.full((B, T), -100)
    terms = sparse_kd_terms(student, topk_targets(teacher, 4, 1.5), labels, _cfg("akl", tail))
    assert terms.kd.item() == 0.0 and terms.ce.item() == 0.0 and terms.n_tokens == 0
    (grad,) = torch.autograd.grad(terms.kd + terms.ce, student)
    assert torch.isfinite(grad).all() and not grad.any()
