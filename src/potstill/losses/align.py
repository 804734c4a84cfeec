"""Cross-tokenizer KD: two tokenizations of the same bytes, aligned into groups, and the loss on them.

The student and the teacher read the same text, each through its own tokenizer. Every token ends at a byte offset
of the text; a *group* is the run of tokens of each side up to the next offset where both sides end a token
(`align_groups`), so a group of student tokens and its group of teacher tokens write exactly the same bytes after
exactly the same preceding bytes. Two terms compare the models (`cross_tokenizer_terms`):

(a) **Group likelihood** (exact): log q(group) = sum of the student's log-probs of its tokens in the group, log p(group)
    the teacher's; both are each model's probability of the same bytes given the same context. The term is the
    binary KL between the two chunk probabilities, KL(Bern(p_g) || Bern(q_g)) (as ALM, Minixhofer et al. 2025): a
    divergence (0 only when equal, a gradient toward the teacher's value from either side), on every aligned group,
    so spans without any shared token (a word one side spells in three tokens) are taught too.
(b) **Distribution** on groups of one token on each side (1:1): the next-token distributions that predict the
    group, conditioned on the same bytes, compared over the shared vocabulary (ids of both that write the same
    bytes) plus one "rest" bucket per side for all other ids, so both stay normalized (`sparse_views`' bucket view
    with the teacher's shared ids as the kept ids). Any divergence of the registry applies, at temperature T.

A group is scored when every student token in it is scored (its label is not -100) and every teacher token in it is
predicted by the teacher (not its first token). Both terms sum over scored groups / 1:1 positions and divide once
by `num_tokens` (the step's scored student tokens), like every other term. The student's head and the teacher's
(262k rows for Gemma) are applied in chunks of rows; the student's chunks are recomputed in the backward
(`torch.utils.checkpoint`), so no [tokens x V] logits of either side exist at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from potstill.losses import Divergence, KDTerms
from potstill.losses.fused import TeacherHead, default_chunk_size
from potstill.losses.sparse import SparseTargets, sparse_divergence, sparse_views


def align_groups(s_ends: torch.Tensor, t_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group two tokenizations of the same byte stream at the byte offsets where both end a token.

    Args:
        s_ends: [Ns] byte offset where each student token ends (non-decreasing).
        t_ends: [Nt] the same for the teacher; both streams end at the same offset.

    Returns:
        (s_group [Ns], t_group [Nt], n_groups): the group of each token (group g ends at the g-th common offset).
    """
    common = torch.unique(s_ends[torch.isin(s_ends, t_ends)])
    return torch.searchsorted(common, s_ends), torch.searchsorted(common, t_ends), common.numel()


@dataclass(frozen=True)
class Alignment:
    """The tokens of a batch on both sides, in stream order, with their groups.

    Attributes:
        s_rows: [Ns] long, flat row (b * L + i - 1) of the student's [B * L] positions that predicts each token.
        s_ids: [Ns] long, the student token ids.
        s_ok: [Ns] bool, the token is scored (label not -100).
        s_group: [Ns] long, its group.
        t_rows, t_ids, t_ok, t_group: the same for the teacher's [B * Lt] positions (t_ok: predicted by the teacher).
        n_groups: number of groups.
    """

    s_rows: torch.Tensor
    s_ids: torch.Tensor
    s_ok: torch.Tensor
    s_group: torch.Tensor
    t_rows: torch.Tensor
    t_ids: torch.Tensor
    t_ok: torch.Tensor
    t_group: torch.Tensor
    n_groups: int

    def to(self, device: torch.device) -> Alignment:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)

    def scored_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scored [G] bool, one_to_one [G] bool): groups the terms score, and those of one token on each side."""
        n = self.n_groups
        s_count = torch.bincount(self.s_group, minlength=n)
        t_count = torch.bincount(self.t_group, minlength=n)
        s_bad = torch.bincount(self.s_group, weights=(~self.s_ok).double(), minlength=n)
        t_bad = torch.bincount(self.t_group, weights=(~self.t_ok).double(), minlength=n)
        scored = (s_count > 0) & (t_count > 0) & (s_bad == 0) & (t_bad == 0)
        return scored, scored & (s_count == 1) & (t_count == 1)


@dataclass(frozen=True)
class StoredTeacher:
    """The teacher's side of a batch read from a cross-tokenizer cache (`potstill.teacher.cache.cross`), per teacher
    stream token (in the order of `Alignment.t_*`).

    Attributes:
        logp: [Nt] float64, the teacher's log-prob (T = 1) of each token it predicts (0 where it predicts none).
        views: SparseTargets [Nt, k]: at the tokens of 1:1 groups, the teacher's k most probable ids of the shared
            vocabulary as *student* ids (`shared_topk`), their log-probs at the cache's temperature, and the rest of
            its mass as `tail`; placeholders at the other tokens.
    """

    logp: torch.Tensor
    views: SparseTargets


@dataclass(frozen=True)
class CrossTargets:
    """What the teacher gives a cross-tokenizer step.

    Attributes:
        teacher: its final hidden states [B * Lt, Ht] and head over its own vocabulary (online), or what a
            cross-tokenizer cache stored (`StoredTeacher`).
        align: the tokens of both sides and their groups.
        student_shared, teacher_shared: [K] ids of the shared vocabulary, pairwise the same token (online teacher;
            a cache stores its views in student ids already).
    """

    teacher: TeacherHead | StoredTeacher
    align: Alignment
    student_shared: torch.Tensor | None = None
    teacher_shared: torch.Tensor | None = None


def one_to_one(al: Alignment) -> tuple[torch.Tensor, torch.Tensor]:
    """(student tokens [p], teacher tokens [p]) of the scored 1:1 groups, as indices into the `s_*` / `t_*` arrays."""
    _, one = al.scored_groups()
    t_of_group = torch.zeros(al.n_groups, dtype=torch.long, device=al.t_ids.device)
    t_of_group[al.t_group] = torch.arange(al.t_ids.numel(), device=al.t_ids.device)
    s_tokens = one[al.s_group].nonzero().squeeze(-1)
    return s_tokens, t_of_group[al.s_group[s_tokens]]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p) || Bern(q)) from log p, log q (elementwise, float64 recommended).

    Probabilities of 1 are clipped to 1 - 1e-12 (their complement would be log 0).
    """
    top = math.log1p(-1e-12)
    log_p, log_q = log_p.clamp_max(top), log_q.clamp_max(top)
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (log1mexp(log_p) - log1mexp(log_q))


def _softcapped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    z = z if z.dtype == torch.float64 else z.float()
    return z if not cap else torch.tanh(z / cap) * cap


def _token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n] float64 log-softmax of `logits` [n, V] at `ids` [n] (T = 1)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1).double()


def teacher_views(logits: torch.Tensor, targets: CrossTargets, temperature: float) -> SparseTargets:
    """The teacher's next-token distributions (logits [n, V]) on the shared vocabulary + rest, as [n, K] sparse
    targets in student ids."""
    ids = targets.teacher_shared.expand(logits.shape[0], -1)
    # the bucket view of `sparse_views` on the teacher's own logits (the placeholder targets' values are unused)
    kept = SparseTargets(ids=ids, logprobs=logits.new_zeros(ids.shape), tail=logits.new_zeros(logits.shape[0]))
    view, _ = sparse_views(logits, kept, temperature, "bucket")
    return SparseTargets(
        ids=targets.student_shared.expand(logits.shape[0], -1),
        logprobs=view[:, :-1],
        tail=view[:, -1].exp(),
        temperature=temperature,
    )


def shared_topk(logits: torch.Tensor, targets: CrossTargets, k: int, temperature: float) -> SparseTargets:
    """What a cross-tokenizer cache stores at a 1:1 token: the teacher's k most probable shared ids (as student ids).

    Args:
        logits: [n, V] teacher logits; targets: their `CrossTargets` (the shared vocabulary).
        k: ids kept (at most the shared vocabulary's K; k >= K keeps them all and equals the online view exactly).

    Returns:
        SparseTargets [n, min(k, K)]: student ids, log-probs at `temperature`, and tail = the rest of the teacher's
        mass (its non-shared ids and the shared ids outside the k), so the bucket view stays normalized.
    """
    view = teacher_views(logits, targets, temperature)
    logprobs, index = view.logprobs.topk(min(k, view.k), dim=-1)
    tail = view.tail if index.shape[-1] == view.k else (-torch.expm1(torch.logsumexp(logprobs, dim=-1))).clamp_min(0)
    return SparseTargets(view.ids.gather(-1, index), logprobs, tail, temperature)


def _teacher_side(
    targets: CrossTargets, tokens: torch.Tensor, temperature: float, views: bool
) -> tuple[torch.Tensor, SparseTargets | None]:
    """(log p [n] float64 of the teacher `tokens` of the stream, their shared-vocabulary views or None), no grad."""
    if isinstance(targets.teacher, StoredTeacher):
        return targets.teacher.logp[tokens], targets.teacher.views.rows(tokens) if views else None
    al = targets.align
    with torch.no_grad():
        logits = targets.teacher.rows(al.t_rows[tokens]).logits()
        return _token_logp(logits, al.t_ids[tokens]), teacher_views(logits, targets, temperature) if views else None


def _student_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    view_ids: torch.Tensor,
    view_logprobs: torch.Tensor,
    view_tail: torch.Tensor,
    ids: torch.Tensor,
    pairs: torch.Tensor,
    temperature: float,
    div: Divergence,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of student rows: (log q of each row's token [c], divergence at its 1:1 rows [p]).

    Args:
        hidden: [c, H] student hidden states; weight: [V, H] its head.
        view_ids, view_logprobs, view_tail: [p, K], [p, K], [p] the teacher's views (student ids) at the chunk's
            1:1 rows (`pairs` [p]), at `temperature`.
        ids: [c] the token each row predicts.
    """
    z = _softcapped(F.linear(hidden, weight), softcap)
    log_q = torch.log_softmax(z, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    if pairs.numel() == 0:
        return log_q, z.new_zeros(0)
    targets = SparseTargets(ids=view_ids, logprobs=view_logprobs, tail=view_tail, temperature=temperature)
    return log_q, sparse_divergence(z[pairs], targets, div, tail="bucket")


def cross_tokenizer_terms(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: CrossTargets,
    div: Divergence,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    seq_weight: float = 1.0,
) -> KDTerms:
    """KD and CE terms of a student against a teacher with another tokenizer (module doc).

    Args:
        student_hidden: [B * L, H] the student's final hidden states (every position, unshifted).
        student_weight: [V, H] its output head; `softcap` its final logit soft-capping or None.
        targets: the teacher's hidden states and head, the alignment, the shared vocabulary.
        div: the divergence of term (b) and its temperature (term (a) compares likelihoods at T = 1).
        num_tokens: normalizer, the step's scored student tokens (default: this batch's).
        chunk_size: rows per head chunk (default: about 2^24 logits of the larger vocabulary).
        seq_weight: weight of term (a) inside the KD term: kd = (b) + seq_weight * (a).

    Returns:
        KDTerms(kd, ce, n_tokens, stats): ce is the student's ordinary CE on its scored tokens; stats holds
        `xtok_one_to_one` (share of scored student tokens in 1:1 groups, term (b)) and `xtok_coverage` (share in
        scored groups, term (a)).
    """
    al, teacher = targets.align, targets.teacher
    scored, one = al.scored_groups()
    s_index = al.s_ok.nonzero().squeeze(-1)  # the scored student tokens, in stream order
    n_scored = s_index.numel()
    denom = max(float(n_scored if num_tokens is None else num_tokens), 1.0)
    vocab = max(student_weight.shape[0], teacher.weight.shape[0] if isinstance(teacher, TeacherHead) else 0)
    chunk = chunk_size or default_chunk_size(vocab)
    # 1:1 groups: the teacher token of each (scatter works: each such group has exactly one token per side)
    t_of_group = torch.zeros(al.n_groups, dtype=torch.long, device=al.t_ids.device)
    t_of_group[al.t_group] = torch.arange(al.t_ids.numel(), device=al.t_ids.device)
    is_pair = one[al.s_group[s_index]]
    # teacher log-probs of its tokens in scored groups (no grad, chunked); those of 1:1 groups come with their
    # distributions in the student's loop below, so each teacher row goes through the 262k head once
    t_logp = torch.zeros(al.t_ids.numel(), dtype=torch.float64, device=al.t_ids.device)
    t_index = (scored[al.t_group] & al.t_ok & ~one[al.t_group]).nonzero().squeeze(-1)
    for part in t_index.split(chunk):
        t_logp[part] = _teacher_side(targets, part, div.temperature, views=False)[0]
    log_q = []
    div_sum = student_hidden.new_zeros((), dtype=torch.float32)
    fn = partial(_student_chunk, div=div, softcap=softcap)
    for start in range(0, n_scored, chunk):
        part = s_index[start : start + chunk]
        pairs = is_pair[start : start + chunk].nonzero().squeeze(-1)
        t_tokens = t_of_group[al.s_group[part[pairs]]]
        t_logp[t_tokens], view = _teacher_side(targets, t_tokens, div.temperature, views=True)
        lq, d = checkpoint(
            fn,
            student_hidden[al.s_rows[part]],
            student_weight,
            view.ids,
            view.logprobs,
            view.tail,
            al.s_ids[part],
            pairs,
            view.temperature,
            use_reentrant=False,
        )
        log_q.append(lq)
        div_sum = div_sum + d.sum()
    log_q = torch.cat(log_q) if log_q else student_hidden.new_zeros(0)
    ce = -log_q.sum() / denom
    # (a): per scored group, the two log-likelihoods of its bytes
    s_sum = torch.zeros(al.n_groups, dtype=torch.float64, device=log_q.device).index_add(
        0, al.s_group[s_index], log_q.double()
    )
    t_sum = torch.zeros(al.n_groups, dtype=torch.float64, device=log_q.device).index_add(0, al.t_group, t_logp)
    seq = binary_kl(t_sum[scored], s_sum[scored]).sum().to(log_q.dtype)
    kd = (div_sum + seq_weight * seq) / denom
    in_scored = scored[al.s_group[s_index]]
    stats = {
        "xtok_one_to_one": float(is_pair.sum()) / max(n_scored, 1),
        "xtok_coverage": float(in_scored.sum()) / max(n_scored, 1),
    }
    return KDTerms(kd=kd, ce=ce, n_tokens=n_scored, stats=stats)
