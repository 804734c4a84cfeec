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
    bytes) plus one "rest" bucket per side for all other ids, so both stay normalized (the bucket view of
    `losses.sparse`, restricted to the shared ids: column selections, `_view`). Any divergence of the registry
    applies, at temperature T.

A group is scored when every student token in it is scored (its label is not -100) and every teacher token in it is
predicted by the teacher (not its first token). Both terms sum over scored groups / 1:1 positions and divide once
by `num_tokens` (the step's scored student tokens), like every other term. The student's head and the teacher's
(262k rows for Gemma) are applied in chunks of rows, so no [tokens x V] logits of either side exist at once. The
student's chunks hold whole groups (`_group_chunks`), so each chunk's gradient is complete in itself: it is computed
in closed form in the forward for the caller's planned weights (`fused.PlannedHeadLoss`, as the same-tokenizer
fused loss), and the backward only scales it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from potstill.losses import Divergence, KDTerms, per_token_divergence
from potstill.losses.fused import PlannedHeadLoss, TeacherHead, default_chunk_size
from potstill.losses.sparse import EMPTY_LOG_MASS, SparseTargets, check_temperature


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


def _logits(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Head outputs -> the logits the loss reads: upcast (float64 kept) and soft-capped."""
    z = z if z.dtype == torch.float64 else z.float()
    return z if not cap else torch.tanh(z / cap) * cap


def _complement(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[vocab - K] the ids of a vocabulary not in `ids` [K] (distinct)."""
    outside = torch.ones(vocab, dtype=torch.bool, device=ids.device)
    outside[ids] = False
    return outside.nonzero().squeeze(-1)


def _view(lp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs `lp` [p, V] on term (b)'s categories: the kept ids and one bucket for all others.

    Args:
        ids: [K] kept ids, the same for every row (the shared vocabulary), or [p, K] per row (a cache's top-k).
        rest: [V - K] the complement of 1-D `ids` (None for per-row ids).

    Returns:
        (view [p, K + 1], the rest bucket's log-mass [p]). An empty bucket gets EMPTY_LOG_MASS (no mass).
    """
    if ids.dim() == 1:  # one index for every row: plain column selections, no [p, V] scatter
        kept = lp.index_select(-1, ids)
        lse = lp.index_select(-1, rest).logsumexp(-1) if rest.numel() else lp.new_full(lp.shape[:1], EMPTY_LOG_MASS)
    else:
        kept = lp.gather(-1, ids)
        fill = (lp.detach().amin(dim=-1, keepdim=True) + EMPTY_LOG_MASS).expand_as(ids)
        lse = lp.scatter(-1, ids, fill).logsumexp(-1)
    return torch.cat([kept, lse[:, None]], dim=-1), lse


def _spread(g: torch.Tensor, lp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor | None, lse: torch.Tensor):
    """d D / d lp-logits [p, V] from g = d D / d view [p, K + 1] (`_view`'s categories; rows of g sum to 0).

    A kept id gets its category's gradient, an id of the bucket the bucket's in proportion q_j / q_rest; the
    - q_j * sum(g) term of the softmax is dropped: every divergence's gradient in its logits sums to 0.
    """
    k = ids.shape[-1]
    if ids.dim() == 1:  # kept and rest partition the columns: every one is written
        out = lp.new_empty(lp.shape).index_copy_(-1, ids, g[:, :k])
        if rest.numel():
            out.index_copy_(-1, rest, g[:, k:] * (lp.index_select(-1, rest) - lse[:, None]).exp())
        return out
    # clamp: kept ids may exceed the bucket's mass; their entries are overwritten just below
    return (g[:, k:] * (lp - lse[:, None]).clamp_max(0).exp()).scatter_(-1, ids, g[:, :k])


def teacher_views(logits: torch.Tensor, targets: CrossTargets, temperature: float) -> SparseTargets:
    """The teacher's next-token distributions (logits [n, V]) on the shared vocabulary + rest, as [n, K] sparse
    targets in student ids."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    view, lse = _view(lp, targets.teacher_shared, _complement(targets.teacher_shared, logits.shape[-1]))
    return SparseTargets(
        ids=targets.student_shared.expand(logits.shape[0], -1),
        logprobs=view[:, :-1],
        tail=lse.exp(),
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
    targets: CrossTargets, tokens: torch.Tensor, temperature: float, views: bool, rest: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The teacher at some tokens of its stream, no grad: (log p [n] float64 of each token at T = 1, and with `views`
    (its view [n, K + 1] at `temperature`, the view's kept student ids: [K] shared or [n, k] per row) or None).

    rest: [Vt - K] the complement of the teacher's shared ids (online teacher, with `views`)."""
    if isinstance(targets.teacher, StoredTeacher):
        if not views:
            return targets.teacher.logp[tokens], None
        top = targets.teacher.views.rows(tokens)
        t_rest = torch.log(top.tail.float()).clamp_min(EMPTY_LOG_MASS)
        return targets.teacher.logp[tokens], (torch.cat([top.logprobs.float(), t_rest[:, None]], -1), top.ids)
    al = targets.align
    with torch.no_grad():
        logits = targets.teacher.rows(al.t_rows[tokens]).logits()
        lp = torch.log_softmax(logits, dim=-1)
        logp = lp.gather(-1, al.t_ids[tokens, None]).squeeze(-1).double()
        if not views:
            return logp, None
        lp_t = lp if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
        return logp, (_view(lp_t, targets.teacher_shared, rest)[0], targets.student_shared)


def _group_chunks(groups: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """(start, stop) spans of about `size` consecutive tokens (`groups` [n], non-decreasing) that never split a
    group: each chunk holds whole groups, so its term (a) and its gradient need no other chunk."""
    n = groups.numel()
    starts = ((groups[1:] != groups[:-1]).nonzero().squeeze(-1) + 1).tolist()  # where a new group begins
    spans, first = [], 0
    while first < n:
        at = bisect.bisect_left(starts, first + size)
        stop = starts[at] if at < len(starts) else n
        spans.append((first, stop))
        first = stop
    return spans


@dataclass
class _CrossProblem:
    """One cross-tokenizer loss call besides the differentiable tensors (`PlannedHeadLoss`' problem)."""

    targets: CrossTargets
    div: Divergence
    scale: float  # 1 / num_tokens
    s_index: torch.Tensor  # [n] the scored student tokens, in stream order
    spans: list[tuple[int, int]]  # chunks of s_index (`_group_chunks`)
    is_pair: torch.Tensor  # [n] the token is a 1:1 group's
    t_of_group: torch.Tensor  # [G] the teacher token of each 1:1 group
    scored: torch.Tensor  # [G] scored groups
    t_sum: torch.Tensor  # [G] float64 teacher log-likelihood of each group (1:1 groups filled in by `run`)
    s_rest: torch.Tensor | None  # student ids outside the shared vocabulary (online teacher)
    t_rest: torch.Tensor | None  # teacher ids outside it
    softcap: float | None
    seq_weight: float

    def run(self, hidden, weight, weights, dtype):
        """The scaled kd and ce sums and, with `weights` (w_kd, w_ce), their gradients, computed chunk by chunk in
        closed form: no autograd graph over [c, V] tensors, no recomputation in the backward.

        Per student row i (logits z_i, token y_i, lp = log softmax(z_i), log q_i = lp[y_i]) the gradient is
        beta_i (onehot(y_i) - softmax(z_i)) with beta_i = d(w_kd (a) + w_ce ce) / d log q_i (term (a) couples only
        the tokens of one group, and a chunk holds whole groups), plus w_kd / T times term (b)'s gradient spread
        from its K + 1 categories back onto the vocabulary (`_spread`) at the 1:1 rows.
        """
        al, div, scale = self.targets.align, self.div, self.scale
        hidden, weight = hidden.detach(), weight.detach()
        out_dtype = _logits(weight[:0, :0], None).dtype  # float32, or float64 for float64 weights (as fused)
        kd_sum = hidden.new_zeros((), dtype=torch.float64)
        ce_sum = kd_sum.clone()
        grad_h = torch.zeros_like(hidden) if weights else None
        grad_w = torch.zeros_like(weight) if weights else None
        w = weight.to(dtype)
        t_div = replace(div, temperature=1.0)  # the views are tempered log-probs already
        for first, stop in self.spans:
            part = self.s_index[first:stop]
            rows, ids = al.s_rows[part], al.s_ids[part]
            pairs = self.is_pair[first:stop].nonzero().squeeze(-1)
            t_tokens = self.t_of_group[al.s_group[part[pairs]]]
            t_logp, (t_view, view_ids) = _teacher_side(self.targets, t_tokens, div.temperature, True, self.t_rest)
            self.t_sum[al.t_group[t_tokens]] = t_logp
            h = hidden[rows].to(dtype)
            with torch.enable_grad():
                z = F.linear(h, w).requires_grad_(weights is not None)
                logits = _logits(z, self.softcap)
            with torch.no_grad():
                lp = torch.log_softmax(logits, dim=-1)
                lp_t = lp[pairs] if div.temperature == 1.0 else torch.log_softmax(logits[pairs] / div.temperature, -1)
                s_view, lse = _view(lp_t, view_ids, self.s_rest)
            sv = s_view.detach().requires_grad_(weights is not None)
            with torch.enable_grad():
                d = per_token_divergence(sv, t_view.to(sv.dtype), t_div).sum()
                # term (a) and ce over this chunk's whole groups, in float64 on [c] log-likelihoods
                log_q = lp.gather(-1, ids[:, None]).squeeze(-1).double().requires_grad_(weights is not None)
                groups, local = torch.unique(al.s_group[part], return_inverse=True)
                s_sum = log_q.new_zeros(groups.numel()).index_add(0, local, log_q)
                keep = self.scored[groups]
                seq = binary_kl(self.t_sum[groups][keep], s_sum[keep]).sum()
                ce = -log_q.sum()
                if weights:
                    w_kd, w_ce = weights[0] * scale, weights[1] * scale
                    small = w_kd * self.seq_weight * seq + w_ce * ce
            kd_sum += d.detach().double() + self.seq_weight * seq.detach()
            ce_sum += ce.detach()
            if not weights:
                continue
            (g_view,) = torch.autograd.grad(d, sv) if pairs.numel() else (None,)
            (beta,) = torch.autograd.grad(small, log_q)
            beta = beta.to(lp.dtype)
            with torch.no_grad():
                g = lp.exp().mul_(-beta[:, None])
                g.scatter_add_(-1, ids[:, None], beta[:, None])
                if g_view is not None:
                    spread = _spread(g_view, lp_t, view_ids, self.s_rest, lse)
                    g.index_add_(0, pairs, spread.mul_(w_kd / div.temperature))
            if logits is not z:  # through the soft-capping / upcast
                (g,) = torch.autograd.grad(logits, z, g)
            g = g.to(dtype)
            grad_h.index_copy_(0, rows, (g @ w).to(hidden.dtype))
            if dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), h)
            else:  # low-precision matmul, accumulated in the weight's dtype (as the fused loss)
                grad_w.add_(g.t() @ h)
        return (kd_sum * scale).to(out_dtype), (ce_sum * scale).to(out_dtype), grad_h, grad_w


def cross_tokenizer_terms(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: CrossTargets,
    div: Divergence,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    seq_weight: float = 1.0,
    loss_weights: tuple[float, float] | None = None,
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
        loss_weights: (w_kd, w_ce) the caller will multiply kd and ce by: gradients are then computed in the
            forward, as the fused loss does (`PlannedHeadLoss`); any other weighting stays exact (recomputed).

    Returns:
        KDTerms(kd, ce, n_tokens, stats): ce is the student's ordinary CE on its scored tokens; stats holds
        `xtok_one_to_one` (share of scored student tokens in 1:1 groups, term (b)) and `xtok_coverage` (share in
        scored groups, term (a)).
    """
    al, teacher = targets.align, targets.teacher
    if isinstance(teacher, StoredTeacher):
        check_temperature(teacher.views, div)
    scored, one = al.scored_groups()
    s_index = al.s_ok.nonzero().squeeze(-1)  # the scored student tokens, in stream order
    n_scored = s_index.numel()
    denom = max(float(n_scored if num_tokens is None else num_tokens), 1.0)
    vocab = max(student_weight.shape[0], teacher.weight.shape[0] if isinstance(teacher, TeacherHead) else 0)
    # 1:1 groups: the teacher token of each (scatter works: each such group has exactly one token per side)
    t_of_group = torch.zeros(al.n_groups, dtype=torch.long, device=al.t_ids.device)
    t_of_group[al.t_group] = torch.arange(al.t_ids.numel(), device=al.t_ids.device)
    is_pair = one[al.s_group[s_index]]
    # teacher log-probs of its tokens in scored groups other than 1:1 (no grad, chunked); those of 1:1 groups come
    # with their distributions in the student's chunks, so each teacher row goes through the 262k head once
    t_logp = torch.zeros(al.t_ids.numel(), dtype=torch.float64, device=al.t_ids.device)
    t_index = (scored[al.t_group] & al.t_ok & ~one[al.t_group]).nonzero().squeeze(-1)
    for part in t_index.split(chunk_size or default_chunk_size(vocab)):
        t_logp[part] = _teacher_side(targets, part, div.temperature, views=False)[0]
    online = isinstance(teacher, TeacherHead)
    prob = _CrossProblem(
        targets=targets,
        div=div,
        scale=1.0 / denom,
        s_index=s_index,
        spans=_group_chunks(al.s_group[s_index], chunk_size or default_chunk_size(vocab)),
        is_pair=is_pair,
        t_of_group=t_of_group,
        scored=scored,
        t_sum=torch.zeros(al.n_groups, dtype=torch.float64, device=t_logp.device).index_add(0, al.t_group, t_logp),
        s_rest=_complement(targets.student_shared, student_weight.shape[0]) if online else None,
        t_rest=_complement(targets.teacher_shared, teacher.weight.shape[0]) if online else None,
        softcap=softcap,
        seq_weight=seq_weight,
    )
    if not torch.is_grad_enabled():
        loss_weights = None  # evaluation: no gradient to compute ahead
    kd, ce = PlannedHeadLoss.apply(student_hidden, student_weight, prob, loss_weights)
    in_scored = scored[al.s_group[s_index]]
    stats = {
        "xtok_one_to_one": float(is_pair.sum()) / max(n_scored, 1),
        "xtok_coverage": float(in_scored.sum()) / max(n_scored, 1),
    }
    return KDTerms(kd=kd, ce=ce, n_tokens=n_scored, stats=stats)
