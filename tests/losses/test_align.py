"""Cross-tokenizer KD loss (losses/align.py): grouping, the binary KL, and the terms against a naive float64 loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from potstill.data.crossbatch import CrossTokenizer
from potstill.data.packing import pack
from potstill.data.sources import Record
from potstill.losses import Divergence, kd_terms
from potstill.losses.align import (
    CrossTargets,
    StoredTeacher,
    _group_chunks,
    align_groups,
    binary_kl,
    cross_tokenizer_terms,
    one_to_one,
    shared_topk,
)
from potstill.losses.fused import TeacherHead
from potstill.losses.sparse import sparse_divergence
from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe


def test_align_groups_by_hand():
    # bytes "abcdef": student "ab|c|def", teacher "a|bc|de|f": common ends 3 and 6
    s_group, t_group, n = align_groups(torch.tensor([2, 3, 6]), torch.tensor([1, 3, 5, 6]))
    assert n == 2 and s_group.tolist() == [0, 0, 1] and t_group.tolist() == [0, 0, 1, 1]
    # a zero-byte token (end 0) joins the group after it; equal tokenizations give one group per token
    s_group, t_group, n = align_groups(torch.tensor([0, 2, 4]), torch.tensor([2, 4]))
    assert n == 2 and s_group.tolist() == [0, 0, 1] and t_group.tolist() == [0, 1]


def test_binary_kl_formula():
    p = torch.tensor([0.3, 0.9, 1e-6, 0.5], dtype=torch.float64)
    q = torch.tensor([0.6, 0.2, 1e-3, 0.5], dtype=torch.float64)
    want = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(binary_kl(p.log(), q.log()), want)
    assert binary_kl(torch.tensor([0.0]), torch.tensor([-1.0])).isfinite().all()  # p = 1: clipped, finite
    assert binary_kl(q.log(), q.log()).abs().max() < 1e-12


def _batch(student_tok, teacher_tok, seq_len=24):
    records = [Record(text=t) for t in TEXTS[:4]]
    data = pack(records, student_tok, seq_len)
    n = min(len(data), 3)
    batch = {k: getattr(data, k)[:n] for k in ("input_ids", "attention_mask", "labels")}
    batch["labels"][0, 5:8] = -100  # some unscored tokens inside a row
    return batch


def _problem(student_tok, teacher_tok, seed=0, hs=8, ht=6):
    """A student batch, its alignment, random student / teacher hidden states and heads (float64)."""
    batch = _batch(student_tok, teacher_tok)
    cross = CrossTokenizer(student_tok, teacher_tok)
    t_ids, _, align = cross.teacher_batch(batch["input_ids"], batch["attention_mask"], batch["labels"])
    g = torch.Generator().manual_seed(seed)
    n_s, n_t = batch["input_ids"].numel(), t_ids.numel()
    s_hidden = torch.randn(n_s, hs, generator=g, dtype=torch.float64).requires_grad_()
    s_weight = torch.randn(len(student_tok), hs, generator=g, dtype=torch.float64).requires_grad_()
    head = TeacherHead(
        hidden=torch.randn(n_t, ht, generator=g, dtype=torch.float64),
        weight=torch.randn(len(teacher_tok), ht, generator=g, dtype=torch.float64),
    )
    targets = CrossTargets(head, align, cross.student_shared, cross.teacher_shared)
    return batch, s_hidden, s_weight, targets


def _naive(s_hidden, s_weight, targets: CrossTargets, T: float, seq_weight: float, denom: float, softcap=None):
    """The module doc's formulas, one group at a time, in float64 (fkl for term (b))."""
    al, head = targets.align, targets.teacher
    z = s_hidden @ s_weight.T
    z = z if softcap is None else torch.tanh(z / softcap) * softcap
    s_logp = torch.log_softmax(z, -1)
    t_logp = torch.log_softmax(head.hidden @ head.weight.T, -1)
    s_logp_t = torch.log_softmax(z / T, -1)
    t_logp_t = torch.log_softmax(head.hidden @ head.weight.T / T, -1)
    s_rows, s_ids, s_ok, s_group = (x.tolist() for x in (al.s_rows, al.s_ids, al.s_ok, al.s_group))
    t_rows, t_ids, t_ok, t_group = (x.tolist() for x in (al.t_rows, al.t_ids, al.t_ok, al.t_group))
    ce = sum(-s_logp[r, i] for r, i, ok in zip(s_rows, s_ids, s_ok, strict=True) if ok)
    kd = torch.zeros((), dtype=torch.float64)
    for g in range(al.n_groups):
        s = [j for j, group in enumerate(s_group) if group == g]
        t = [j for j, group in enumerate(t_group) if group == g]
        if not s or not t or not all(s_ok[j] for j in s) or not all(t_ok[j] for j in t):
            continue
        lq = sum(s_logp[s_rows[j], s_ids[j]] for j in s)
        lp = sum(t_logp[t_rows[j], t_ids[j]] for j in t)
        p, q = lp.exp().clamp_max(1 - 1e-12), lq.exp().clamp_max(1 - 1e-12)
        kd = kd + seq_weight * (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))
        if len(s) == 1 and len(t) == 1:
            qs = s_logp_t[s_rows[s[0]]].exp()
            pt = t_logp_t[t_rows[t[0]]].exp()
            qv = torch.cat([qs[targets.student_shared], (1 - qs[targets.student_shared].sum())[None]])
            pv = torch.cat([pt[targets.teacher_shared], (1 - pt[targets.teacher_shared].sum())[None]])
            kd = kd + (pv * (pv / qv).log()).sum()
    return kd / denom, ce / denom


@pytest.mark.parametrize("pair", ["bytelevel->metaspace", "metaspace->bytelevel"])
def test_terms_equal_naive_float64(pair):
    """Value and gradient of kd and ce against `_naive`, both directions of the two tokenizer families."""
    a, m = byte_level_bpe(), metaspace_bpe()
    student_tok, teacher_tok = (a, m) if pair.startswith("byte") else (m, a)
    _, s_hidden, s_weight, targets = _problem(student_tok, teacher_tok)
    div = Divergence(name="fkl", temperature=1.7)
    terms = cross_tokenizer_terms(s_hidden, s_weight, targets, div, num_tokens=50, chunk_size=7, seq_weight=0.6)
    kd, ce = _naive(s_hidden, s_weight, targets, 1.7, 0.6, 50.0)
    torch.testing.assert_close(terms.kd, kd)
    torch.testing.assert_close(terms.ce, ce)
    got = torch.autograd.grad(terms.kd + 0.3 * terms.ce, (s_hidden, s_weight))
    want = torch.autograd.grad(kd + 0.3 * ce, (s_hidden, s_weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert 0 < terms.stats["xtok_one_to_one"] <= terms.stats["xtok_coverage"] <= 1


@pytest.mark.parametrize("planned", [(2.0, 0.6), (1.0, 1.0), None])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_planned_gradient_equals_naive(planned, softcap):
    """The gradient computed in the forward for `loss_weights` (proportional to the actual weights 1 : 0.3, or not:
    then recomputed in the backward) equals the naive loop's, with and without soft-capping, at chunks of 3 rows
    (groups never split) and with the step's normalizer."""
    _, s_hidden, s_weight, targets = _problem(metaspace_bpe(), byte_level_bpe(), seed=1)
    div = Divergence(name="fkl", temperature=1.3)
    terms = cross_tokenizer_terms(
        s_hidden, s_weight, targets, div, num_tokens=45, chunk_size=3, softcap=softcap, seq_weight=0.8,
        loss_weights=planned,
    )  # fmt: skip
    kd, ce = _naive(s_hidden, s_weight, targets, 1.3, 0.8, 45.0, softcap=softcap)
    torch.testing.assert_close(terms.kd, kd)
    torch.testing.assert_close(terms.ce, ce)
    for retain in (True, False):  # a second backward (retained graph) recomputes: the same gradient
        got = torch.autograd.grad(terms.kd + 0.3 * terms.ce, (s_hidden, s_weight), retain_graph=retain)
        want = torch.autograd.grad(kd + 0.3 * ce, (s_hidden, s_weight), retain_graph=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_stored_teacher_gradient_equals_autograd_reference():
    """A cache's teacher (per-row top-k views in student ids, tail, log-likelihoods): kd, ce and the closed-form
    gradient equal autograd through the bucket view of `losses.sparse` (the reference formulation)."""
    student_tok, teacher_tok = byte_level_bpe(), metaspace_bpe()
    _, s_hidden, s_weight, online = _problem(student_tok, teacher_tok, seed=2)
    al, head = online.align, online.teacher
    logits = head.rows(al.t_rows).logits()
    top = shared_topk(logits, online, 5, 1.5)
    logp = torch.log_softmax(logits, -1).gather(-1, al.t_ids[:, None]).squeeze(-1)
    stored = CrossTargets(StoredTeacher(logp=torch.where(al.t_ok, logp, 0.0), views=top), al)
    div = Divergence(name="jsd", beta=0.4, temperature=1.5)
    terms = cross_tokenizer_terms(s_hidden, s_weight, stored, div, chunk_size=4, loss_weights=(1.0, 0.5))
    # reference: every student row's logits under autograd, term (b) by sparse_divergence's bucket view
    s_logits = s_hidden @ s_weight.T
    s_tok, t_tok = one_to_one(al)
    scored, _ = al.scored_groups()
    s_logp = torch.log_softmax(s_logits, -1)[al.s_rows, al.s_ids]
    s_sum = torch.zeros(al.n_groups, dtype=torch.float64).index_add(0, al.s_group[al.s_ok], s_logp[al.s_ok])
    t_sum = torch.zeros(al.n_groups, dtype=torch.float64).index_add(0, al.t_group, logp.where(al.t_ok, 0.0))
    b = sparse_divergence(s_logits[al.s_rows[s_tok]], top.rows(t_tok), div, tail="bucket").sum()
    n = int(al.s_ok.sum())
    kd = (b + binary_kl(t_sum[scored], s_sum[scored]).sum()) / n
    ce = -s_logp[al.s_ok].sum() / n
    torch.testing.assert_close(terms.kd, kd)
    torch.testing.assert_close(terms.ce, ce)
    got = torch.autograd.grad(terms.kd + 0.5 * terms.ce, (s_hidden, s_weight))
    want = torch.autograd.grad(kd + 0.5 * ce, (s_hidden, s_weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bf16_autocast_planned_equals_recomputed():
    """Under bf16 autocast (train.mixed_precision) the head's matmuls run in bf16 and the gradient lands in the
    float32 parameters; the planned gradient equals the recomputed one and stays near the float32 value."""
    _, s_hidden, s_weight, targets = _problem(byte_level_bpe(), metaspace_bpe(), seed=3)
    hidden, weight = s_hidden.detach().float().requires_grad_(), s_weight.detach().float().requires_grad_()
    head = targets.teacher
    targets = replace(targets, teacher=replace(head, hidden=head.hidden.float(), weight=head.weight.float()))
    div = Divergence(name="fkl")
    grads = []
    for planned in ((0.5, 0.5), None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = cross_tokenizer_terms(hidden, weight, targets, div, chunk_size=5, loss_weights=planned)
        assert terms.kd.dtype == torch.float32
        grads.append(torch.autograd.grad(0.5 * terms.kd + 0.5 * terms.ce, (hidden, weight)))
    exact = cross_tokenizer_terms(hidden, weight, targets, div)
    want = torch.autograd.grad(0.5 * exact.kd + 0.5 * exact.ce, (hidden, weight))
    for planned, recomputed, full in zip(*grads, want, strict=True):
        assert planned.dtype == torch.float32
        torch.testing.assert_close(planned, recomputed)
        torch.testing.assert_close(planned, full, rtol=0.05, atol=0.02 * float(full.abs().max()))


def test_chunks_hold_whole_groups():
    assert _group_chunks(torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]), 3) == [(0, 5), (5, 8)]
    assert _group_chunks(torch.tensor([0, 1, 2, 3]), 2) == [(0, 2), (2, 4)]
    assert _group_chunks(torch.tensor([5, 5, 5]), 1) == [(0, 3)]
    assert _group_chunks(torch.tensor([], dtype=torch.long), 4) == []


def test_chunking_does_not_change_the_terms():
    _, s_hidden, s_weight, targets = _problem(byte_level_bpe(), metaspace_bpe())
    div = Divergence(name="jsd", beta=0.3)
    small = cross_tokenizer_terms(s_hidden, s_weight, targets, div, chunk_size=2)
    large = cross_tokenizer_terms(s_hidden, s_weight, targets, div)
    torch.testing.assert_close(small.kd, large.kd)
    torch.testing.assert_close(small.ce, large.ce)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_same_tokenizer_distribution_term_is_ordinary_kd(name):
    """With one tokenizer on both sides every token is a 1:1 group over the whole vocabulary: term (b) equals
    kd_terms on the full logits and ce equals the ordinary CE (value and gradient)."""
    tok = byte_level_bpe()
    batch, s_hidden, s_weight, targets = _problem(tok, tok, ht=8)
    assert targets.student_shared.numel() == len(tok)
    div = Divergence(name=name, temperature=2.0, beta=0.3)
    terms = cross_tokenizer_terms(s_hidden, s_weight, targets, div, num_tokens=40, seq_weight=0.0)
    B, L = batch["input_ids"].shape
    t = targets.teacher
    t_logits = (t.hidden @ t.weight.T).reshape(B, L, -1)  # the same tokens: the teacher rows are the student's
    dense = kd_terms((s_hidden @ s_weight.T).reshape(B, L, -1), t_logits, batch["labels"], div, num_tokens=40)
    assert terms.stats["xtok_one_to_one"] == 1.0
    torch.testing.assert_close(terms.kd, dense.kd)
    torch.testing.assert_close(terms.ce, dense.ce)
    got = torch.autograd.grad(terms.kd + terms.ce, s_hidden)[0]
    want = torch.autograd.grad(dense.kd + dense.ce, s_hidden)[0]
    torch.testing.assert_close(got, want)


def test_identical_models_give_zero_kd():
    tok = byte_level_bpe()
    _, s_hidden, s_weight, targets = _problem(tok, tok, hs=6, ht=6)
    same = CrossTargets(
        TeacherHead(hidden=s_hidden.detach()[: targets.teacher.hidden.shape[0]], weight=s_weight.detach()),
        targets.align,
        targets.student_shared,
        targets.teacher_shared,
    )
    terms = cross_tokenizer_terms(s_hidden, s_weight, same, Divergence())
    assert math.isclose(terms.kd.item(), 0.0, abs_tol=1e-9)
