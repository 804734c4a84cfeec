"""Classifier KD: the same zoo, temperature, alpha, T^2 and normalization as text KD, on [batch, classes] logits."""

from __future__ import annotations

import pytest
import torch

from potstill.config import LOSS_NAMES
from potstill.errors import UserError
from potstill.losses import Divergence, combine, kd_terms, per_token_divergence
from potstill.losses.classifier import classifier_kd_terms
from potstill.losses.sparse import topk_targets

B, C = 7, 13


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, C, (B,), generator=g)
    labels[3] = -100
    return student, teacher, labels


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_equals_the_zoo_divergence_on_the_same_logits(name):
    student, teacher, labels = _batch()
    div = Divergence(name, temperature=1.7, beta=0.3, skew=0.2, akl_mu=0.4)
    terms = classifier_kd_terms(student, teacher, labels, div)
    keep = labels != -100
    expected = per_token_divergence(student[keep], teacher[keep], div).sum() / keep.sum()
    torch.testing.assert_close(terms.kd, expected)
    assert terms.n_tokens == int(keep.sum())
    # and the text path on one "token" per item (labels shifted by one position) gives the same number
    text_labels = torch.stack([torch.full_like(labels, -100), labels], dim=1)
    text = kd_terms(torch.stack([student, student], 1), torch.stack([teacher, teacher], 1), text_labels, div)
    torch.testing.assert_close(terms.kd, text.kd)
    torch.testing.assert_close(terms.ce, text.ce)


def test_fkl_objective_equals_a_naive_float64_formula():
    student, teacher, labels = _batch(1)
    alpha, temp = 0.7, 2.5
    terms = classifier_kd_terms(student, teacher, labels, Divergence("fkl", temperature=temp))
    loss = combine(terms, alpha, temp)
    keep = labels != -100
    p = torch.softmax(teacher[keep] / temp, -1)
    q = torch.softmax(student[keep] / temp, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ce = -torch.log_softmax(student[keep], -1).gather(1, labels[keep, None]).mean()
    naive = alpha * temp**2 * kl + (1 - alpha) * ce
    torch.testing.assert_close(loss, naive)
    grad, naive_grad = torch.autograd.grad(loss, student)[0], torch.autograd.grad(naive, student)[0]
    torch.testing.assert_close(grad, naive_grad)


def test_split_batch_with_global_count_equals_whole_batch_and_all_masked_is_zero():
    student, teacher, labels = _batch(2)
    div = Divergence("jsd", temperature=1.3)
    whole = combine(classifier_kd_terms(student, teacher, labels, div), 0.5, 1.3)
    n = int((labels != -100).sum())
    parts = sum(
        combine(classifier_kd_terms(student[s], teacher[s], labels[s], div, num_items=n), 0.5, 1.3)
        for s in (slice(0, 3), slice(3, B))
    )
    torch.testing.assert_close(parts, whole)
    none = classifier_kd_terms(student, teacher, torch.full((B,), -100), div)
    assert none.kd.item() == 0.0 and none.ce.item() == 0.0 and none.n_tokens == 0


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_sparse_targets_at_k_equal_classes_equal_dense(tail):
    student, teacher, labels = _batch(3)
    div = Divergence("fkl", temperature=2.0)
    dense = classifier_kd_terms(student, teacher, labels, div)
    sparse = classifier_kd_terms(student, topk_targets(teacher, C, 2.0), labels, div, tail=tail)
    torch.testing.assert_close(sparse.kd, dense.kd)
    small = classifier_kd_terms(student, topk_targets(teacher, 4, 2.0), labels, div)  # bucket: a lower bound
    assert small.kd.item() <= dense.kd.item() + 1e-12


def test_bad_shapes_are_one_line_errors():
    student, teacher, labels = _batch()
    div = Divergence("fkl")
    for args, needle in [
        ((student[:, None], teacher, labels), "expected student logits [B, C]"),
        ((student, teacher[:, :5], labels), "map the teacher's classes"),
        ((student[:, :5], topk_targets(teacher, 6), labels), "do not fit"),
    ]:
        with pytest.raises(UserError, match="classifier KD") as err:
            classifier_kd_terms(*args, div)
        assert needle in str(err.value) and "\n" not in str(err.value)
