"""The KD step, written once: student forward -> teacher targets -> loss terms -> weights.

`DistillTrainer.compute_loss` runs it on every micro-batch and `potstill plan`'s probe times its parts, so the
plan measures exactly what training does. One micro-batch:

1. `student_head(model, loss)`: the student's (head weight [V, H], softcap) when the fused loss applies (a plain
   linear head, `loss.fused`), else None (dense path: full [B, L, V] logits).
2. `teacher_targets(teacher, inputs, fused)`: what the student is compared with: `SparseTargets` [B, L, k] from a
   teacher cache, a `TeacherHead` (hidden states [B, L, H] + head) from an online teacher on the fused path, or
   teacher logits [B, L, V] (dense, or an online teacher whose head cannot be chunked); None for CE only.
3. `student_outputs(model, inputs, fused)`: the student's forward: final hidden states (`logits_to_keep=1`, no
   [B, L, V] logits) on the fused path, logits on the dense one. Goes through the (possibly DDP-wrapped) model.
4. `loss_terms(...)`: the two terms (KD, CE), each summed over the scored positions and divided by `num_tokens`
   (`losses.fused_kd_terms`, `kd_terms` or `sparse_kd_terms`); `losses.combine` then weights them with
   `kd_weights(alpha, T)`. Fused and dense give the same loss and gradients (tests/train/test_trainer_fused.py).
5. With `hidden.weight > 0` (a `HiddenPlan`): the teacher's forward also returns the mapped layers' outputs, and
   `losses.hidden.hidden_term` compares them with the student's on the same scored positions (a third term).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from potstill.config import LossConfig
from potstill.errors import UserError
from potstill.losses import Divergence, KDTerms, kd_terms, kd_weights, scored_mask
from potstill.losses.align import CrossTargets, cross_tokenizer_terms
from potstill.losses.fused import TeacherHead, fused_kd_terms
from potstill.losses.hidden import hidden_term
from potstill.losses.sparse import SparseTargets, sparse_kd_terms
from potstill.models.heads import head_of
from potstill.teacher.cache.cross import CrossCache
from potstill.teacher.cross import CrossTokenizerTeacher
from potstill.teacher.scoring import EndpointScorer
from potstill.teacher.several import TeacherSet
from potstill.train.hidden import HiddenPlan

CROSS = (CrossTokenizerTeacher, CrossCache)  # teachers of another tokenizer than the student's: `targets_for(inputs)`
Targets = TeacherHead | SparseTargets | CrossTargets | torch.Tensor | None
Head = tuple[torch.Tensor, float | None]


def divergence(loss: LossConfig) -> Divergence:
    """The `Divergence` (name, parameters, temperature, sparse tail) of a `loss` config section."""
    return Divergence(**{f.name: getattr(loss, f.name) for f in fields(Divergence)})


def student_head(model: nn.Module, loss: LossConfig) -> Head | None:
    """(head weight [V, H], softcap) of the unwrapped student for the fused loss, or None for the dense path."""
    return head_of(model) if loss.fused else None


def teacher_targets(teacher, inputs: dict[str, Any], fused: bool, layers: Sequence[int] = ()) -> Targets:
    """The teacher's side of the loss on this batch (with `layers`: also those decoder layers' outputs).

    Args:
        teacher: an `OnlineTeacher`, a teacher cache (`.targets(indices [B]) -> SparseTargets [B, L, k]`; batches
            then carry `index` [B]), an `EndpointScorer` (its top-k of the batch), a teacher of another tokenizer
            (`CROSS`: online or its cache, `targets_for(inputs) -> CrossTargets`), or None (CE only).
        inputs: the batch: `input_ids` [B, L], `attention_mask` [B, L], for a cache `index` [B].
        fused: the student takes the fused path (an online teacher then returns its hidden states and head).
        layers: teacher decoder layers whose outputs the hidden-state term needs (online teacher only).

    Returns:
        SparseTargets [B, L, k] (top-k / sampled cache, endpoint); TeacherHead with hidden [B, L, H] (online or
        hidden-state cache, fused); teacher logits [B, L, V] (dense; also when an online teacher's head cannot be
        chunked); None. With `layers`: (those targets, one [B, L, H] state per layer).
    """
    if teacher is None:
        return None
    if isinstance(teacher, CROSS):  # another tokenizer: the same text through its own (online or cached)
        return teacher.targets_for(inputs)
    ids = inputs["input_ids"]
    if isinstance(teacher, EndpointScorer):  # a teacher behind a server: its top-k, aligned like a cache's
        return teacher.score(ids, inputs.get("attention_mask")).targets
    if hasattr(teacher, "targets"):
        if "index" not in inputs:
            raise ValueError("a teacher cache needs batches with 'index' (wrap the dataset in IndexedDataset)")
        targets = _to_device(teacher.targets(inputs["index"].cpu()), ids.device)
        # a hidden-state cache gives the teacher's states + head: the dense path needs its logits
        return targets.logits() if isinstance(targets, TeacherHead) and not fused else targets
    mask = inputs.get("attention_mask")
    if layers:
        return teacher.with_layers(ids, mask, fused=fused, layers=layers)
    head = teacher.head_inputs(ids, mask) if fused else None
    return teacher.logits(ids, mask) if head is None else head


def takes_fused_path(head: Head | None, targets: Targets) -> bool:
    """Whether this micro-batch runs the fused loss: a student head to chunk and no dense teacher logits."""
    return head is not None and not isinstance(targets, torch.Tensor)


def student_outputs(model: nn.Module, inputs: dict[str, Any], fused: bool, hidden: bool = False):
    """The student's forward: hidden states only (fused; the last one is the head's input) or full logits (with
    every layer's hidden states too when `hidden`: the hidden-state term reads them)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if fused:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)


def loss_terms(
    outputs,
    labels: torch.Tensor,
    targets: Targets,
    head: Head | None,
    loss: LossConfig,
    num_tokens: torch.Tensor | int | None,
    weights: tuple[float, float] | None = None,
) -> KDTerms:
    """The KD and CE terms of one micro-batch, each summed over scored positions and divided by `num_tokens`.

    Args:
        outputs: `student_outputs` (hidden states when `head` is given, else logits [B, L, V]).
        labels: [B, L] unshifted labels (-100 = not scored).
        targets: `teacher_targets` of the batch.
        head: the student's head on the fused path, else None.
        loss: the `loss` config section.
        num_tokens: the step's global count of scored positions (None: this batch's own).
        weights: (w_kd, w_ce) the caller will weight the terms with (fused path: gradients computed in the forward).
    """
    div = divergence(loss)
    if isinstance(targets, CrossTargets):
        if head is None:
            raise UserError(
                "cross-tokenizer KD applies the student's head in chunks: it needs a plain linear output head and"
                " a run without FSDP / DeepSpeed sharding"
            )
        weight, softcap = head
        hidden = outputs.hidden_states[-1]
        return cross_tokenizer_terms(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets,
            div,
            num_tokens=num_tokens,
            chunk_size=loss.chunk_size,
            softcap=softcap,
            seq_weight=loss.cross_seq_weight,
            loss_weights=weights,
        )
    if head is None:
        if isinstance(targets, SparseTargets):
            return sparse_kd_terms(outputs.logits, targets, labels, div, num_tokens=num_tokens)
        return kd_terms(outputs.logits, targets, labels, div, num_tokens=num_tokens)
    hidden = outputs.hidden_states[-1][:, :-1]  # position t predicts label t + 1
    if isinstance(targets, TeacherHead):
        targets = replace(targets, hidden=targets.hidden[:, :-1].reshape(-1, targets.hidden.shape[-1]))
    elif isinstance(targets, SparseTargets):
        targets = _shifted(targets).flatten()
    weight, softcap = head
    return fused_kd_terms(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets,
        labels[:, 1:].reshape(-1),
        div,
        num_tokens=num_tokens,
        chunk_size=loss.chunk_size,
        softcap=softcap,
        loss_weights=weights,
    )


def kd_micro_step(
    model: nn.Module,
    unwrapped: nn.Module,
    inputs: dict[str, Any],
    teacher,
    loss: LossConfig,
    alpha: float | None,
    num_tokens: torch.Tensor | int | None,
    plan_weights: bool = True,
    dense: bool = False,
    hidden: HiddenPlan | None = None,
) -> tuple[KDTerms, Any]:
    """Steps 1-4 on one micro-batch: the normalized terms (KD, CE; the hidden-state one with `hidden`) and the
    student's outputs.

    Args:
        model: the student as the Trainer runs it (possibly DDP-wrapped).
        unwrapped: the bare student (its head).
        inputs: the batch (`input_ids`, `attention_mask`, `labels` [B, L]; `index` [B] with a cache).
        teacher: an `OnlineTeacher`, a teacher cache, or None (CE only).
        loss: the `loss` config section.
        alpha: the KD weight in use (None while `alpha: auto` has not chosen it).
        num_tokens: the step's global count of scored positions.
        plan_weights: let the fused loss compute its gradient in the forward for `kd_weights(alpha, T)` (off when
            the caller takes other gradients of the terms first).
        dense: force the dense path (sharded weights under FSDP / DeepSpeed cannot be chunked).
        hidden: the run's hidden-state term (`train.hidden.hidden_plan`; needs an online teacher), or None.
    """
    if isinstance(teacher, TeacherSet):
        return several_terms(model, unwrapped, inputs, teacher, loss, alpha, num_tokens, plan_weights, dense)
    cross = isinstance(teacher, CROSS)  # always chunked: its head is needed whatever loss.fused says
    head = None if dense else head_of(unwrapped) if cross else student_head(unwrapped, loss)
    targets = teacher_targets(teacher, inputs, fused=head is not None, layers=hidden.teacher_layers if hidden else ())
    targets, teacher_states = targets if hidden else (targets, None)
    fused = takes_fused_path(head, targets)
    outputs = student_outputs(model, inputs, fused, hidden=hidden is not None)
    weights = kd_weights(alpha, loss.temperature) if alpha is not None and plan_weights else None
    terms = loss_terms(outputs, inputs["labels"], targets, head if fused else None, loss, num_tokens, weights)
    if hidden is not None:
        states = [outputs.hidden_states[i + 1] for i in hidden.student_layers]
        if hidden.teacher_filters is not None:  # TED: the teacher's frozen task-aware filters
            with torch.no_grad():
                teacher_states = [f(t) for f, t in zip(hidden.teacher_filters, teacher_states, strict=True)]
        mask = scored_mask(inputs["labels"])
        terms.hidden = hidden_term(states, teacher_states, mask, hidden.distance, num_tokens, hidden.projections)
    return terms, outputs


def several_terms(
    model: nn.Module,
    unwrapped: nn.Module,
    inputs: dict[str, Any],
    teachers: TeacherSet,
    loss: LossConfig,
    alpha: float | None,
    num_tokens: torch.Tensor | int | None,
    plan_weights: bool = True,
    dense: bool = False,
) -> tuple[KDTerms, Any]:
    """Steps 1-4 with several teachers (`model.teachers`): one student forward, one teacher forward per route.

    kd = sum over routes of share x (that teacher's KD term on the route's rows); ce = the CE of every row, taken
    from one route per row (`teacher.several`). Each route's term is the one-teacher term of its path (fused,
    dense, or cross-tokenizer), normalized by the step's `num_tokens` like every term. Logged per teacher k:
    `kd/t{k}` (its unweighted term on its rows) and, for a teacher of another tokenizer, its alignment figures.
    """
    routes = teachers.routes(inputs["domain"])
    cross = any(isinstance(t, CrossTokenizerTeacher) for t in teachers.members)
    head = None if dense else head_of(unwrapped) if cross else student_head(unwrapped, loss)
    subs = [{key: _take(value, r.rows) for key, value in inputs.items()} for r in routes]
    targets = [
        teacher_targets(teachers.members[r.teacher], sub, fused=head is not None)
        for r, sub in zip(routes, subs, strict=True)
    ]
    fused = head is not None and not any(isinstance(t, torch.Tensor) for t in targets)
    if not fused:  # one teacher's head cannot be chunked: every same-tokenizer route takes the dense path
        targets = [t.logits() if isinstance(t, TeacherHead) else t for t in targets]
    outputs = student_outputs(model, inputs, fused)
    w_kd, w_ce = kd_weights(alpha, loss.temperature) if alpha is not None and plan_weights else (None, None)
    kd = ce = 0.0
    stats: dict[str, float] = {}
    for route, sub, target in zip(routes, subs, targets, strict=True):
        index = torch.tensor(route.rows, device=inputs["input_ids"].device)
        part = SimpleNamespace(
            hidden_states=None if not fused else (outputs.hidden_states[-1][index],),
            logits=None if fused else outputs.logits[index],
        )
        weights = None if w_kd is None else (w_kd * route.share, w_ce if route.ce else 0.0)
        terms = loss_terms(part, sub["labels"], target, head if fused else None, loss, num_tokens, weights)
        kd = kd + route.share * terms.kd
        ce = ce + terms.ce if route.ce else ce
        key = f"kd/t{route.teacher}"
        stats[key] = stats.get(key, 0.0) + float(terms.kd.detach())
        for name, value in (terms.stats or {}).items():  # cross-tokenizer alignment figures, per teacher
            stats[f"{name}/t{route.teacher}"] = value
    n_tokens = int(scored_mask(inputs["labels"]).sum())
    return KDTerms(kd=kd, ce=ce, n_tokens=n_tokens, stats=stats), outputs


def _take(value, rows: list[int]):
    """Rows of one batch entry: a [B, ...] tensor or a list of B items (`domain`)."""
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, device=value.device)]
    return [value[i] for i in rows]


def _shifted(targets: SparseTargets) -> SparseTargets:
    """[B, L, k] targets -> [B, L - 1, k]: the positions that predict a next token."""
    return replace(targets, ids=targets.ids[:, :-1], logprobs=targets.logprobs[:, :-1], tail=targets.tail[:, :-1])


def _to_device(targets: SparseTargets | TeacherHead, device: torch.device) -> SparseTargets | TeacherHead:
    if isinstance(targets, TeacherHead):
        return replace(targets, hidden=targets.hidden.to(device), weight=targets.weight.to(device))
    return replace(
        targets, ids=targets.ids.to(device), logprobs=targets.logprobs.to(device), tail=targets.tail.to(device)
    )
