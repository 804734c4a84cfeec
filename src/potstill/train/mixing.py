"""Domain mixing inside `DistillTrainer`: the `DomainSampler` it draws from and the DDK re-weighting callback.

The math (Eq. 1 / Eq. 2, the gaps, the held-out split) lives in `potstill.data.mixing`; this module runs it
during training. `setup_mixing(cfg, train_ds, eval_ds, teacher, out)` (the `distill` recipe calls it when
`data.mixing` is set)
checks the domains and builds the sampler over the training sequences; `.attach(trainer)` adds the callbacks:

- `MixingState` (ExportableState): the sampler's weight history and DDK's teacher figures, stored in every
  checkpoint's trainer_state.json; on resume the sampler continues at draw `global_step * batch * accum *
  world` (the Trainer's own batch skipping is off, `ignore_data_skip`), so a resumed run draws what the
  uninterrupted one would have.
- `MixingCallback`: with mode `ddk`, scores the student on each domain's held-out sequences (at most
  `eval_tokens` scored tokens per domain) before the first step (Eq. 1) and every `interval` steps (Eq. 2);
  the teacher's per-domain figures are measured once (several teachers, `model.teachers`: each domain against its
  own teachers, their figures averaged in log space by share). With `warmup` W > 0 the mix stays uniform for the
  first W steps (the step-0 gaps are still measured and logged, rule `warmup`), Eq. 1 runs after step W and
  Eq. 2 every `interval` steps after that: a freshly pruned student's gaps say nothing yet about where it
  will lag (on Gemma its ppl ratios were ~1e9 to 1e10 and Eq. 1 put all weight on one domain).
  Weights computed after step S apply from step S + 2 on:
  the dataloader has already fetched step S + 1's first batch. Each update is appended to `OUT/mixing.jsonl`
  and the current weights are added to every training log (`weight/<domain>`).

Held-out data: the `data.eval` sequences of each training domain; without `data.eval`, the last sequences of
each training domain (enough for `eval_tokens`) are held out from training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from potstill.config import DistillConfig, MixingConfig
from potstill.data.mixing import (
    DomainSampler,
    check_weights,
    ddk_initial,
    ddk_update,
    domain_gaps,
    split_heldout,
    static_weights,
)
from potstill.errors import UserError
from potstill.eval.metrics import evaluate
from potstill.launch import world_size
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.several import TeacherSet
from potstill.train.rundir import MIXING_FILE, truncate_log

logger = logging.getLogger(__name__)

_GAP_KEY = {"ppl": "ppl", "logppl": "ppl", "bpb": "bpb", "kl": "kl_to_teacher"}


class MixingState(TrainerCallback, ExportableState):
    """The mixing state saved in checkpoints (trainer_state.json), restored on resume.

    Args:
        sampler: `DomainSampler.state_dict()` (None before training starts).
        teacher: domain -> the teacher's held-out figure for the gap (ppl or bpb), measured once.
    """

    def __init__(self, sampler: dict | None = None, teacher: dict | None = None):
        self.sampler = sampler
        self.teacher = teacher

    def state(self) -> dict:
        return {"args": {"sampler": self.sampler, "teacher": self.teacher}, "attributes": {}}


class MixingCallback(TrainerCallback):
    """Keeps the sampler and `MixingState` in step; runs DDK's updates (see the module docstring).

    Args:
        sampler: the trainer's training sampler.
        cfg: `data.mixing`.
        heldout: domain -> held-out packed sequences (mode ddk only).
        teacher: the online teacher (mode ddk only).
        out: the run directory (mixing.jsonl).
        batch_size: sequences per forward pass when scoring held-out data.
    """

    def __init__(self, sampler: DomainSampler, cfg: MixingConfig, heldout: dict, teacher, out: Path, batch_size: int):
        self.sampler, self.cfg, self.heldout, self.teacher = sampler, cfg, heldout, teacher
        self.path, self.batch_size = out / MIXING_FILE, batch_size
        self.handler = None  # the trainer's callback handler, where the (possibly restored) MixingState lives
        self._per_step = 0  # global draws per optimizer step

    @property
    def saved(self) -> MixingState:
        # Looked up each time: restoring a checkpoint replaces the MixingState object.
        return next(cb for cb in self.handler.callbacks if isinstance(cb, MixingState))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.saved.sampler is not None:  # resumed
            self.sampler.load_state_dict(self.saved.sampler)
            self.sampler.seek(state.global_step * self._per_step)
            if state.is_world_process_zero:
                truncate_log(self.path, state.global_step)
        elif self.cfg.mode == "ddk":
            self._update(model, state, "warmup" if self.cfg.warmup else "eq1")
        else:
            self._append(state, {"step": 0, "rule": self.cfg.mode, "weights": self.sampler.weights})
        self.saved.sampler = self.sampler.state_dict()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step, warmup = state.global_step, self.cfg.warmup
        if self.cfg.mode == "ddk" and step < state.max_steps:
            if warmup and step == warmup:
                self._update(model, state, "eq1")
            elif step > warmup and (step - warmup) % self.cfg.interval == 0:
                self._update(model, state, "eq2")
        self.saved.sampler = self.sampler.state_dict()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.cfg.mode == "ddk":  # the "after" figures of `potstill report`; the weights stay
            gaps, student, seconds = self._measure(model)
            self._append(state, self._entry(state.global_step, "final", gaps, self.sampler.weights, student, seconds))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update({f"weight/{d}": w for d, w in self.sampler.weights.items()})

    def _update(self, model: nn.Module, state, rule: str) -> None:
        """Measure the gaps, apply `rule` (eq1, eq2, or warmup: keep the uniform mix), hand the weights to the
        sampler, log them."""
        gaps, student, seconds = self._measure(model)
        if rule == "eq1":
            weights = ddk_initial(gaps)
        elif rule == "eq2":
            weights = ddk_update(self.sampler.weights, gaps, self.cfg.smoothing)
        else:
            weights = self.sampler.weights
        weights = _same_on_all_ranks(weights)
        # Draws up to the end of the next step may already be fetched: new weights apply after them.
        step = state.global_step
        self.sampler.set_weights(weights, start=(step + 1) * self._per_step if step else 0)
        entry = self._entry(step, rule, gaps, weights, student, seconds)
        entry["apply_from_step"] = step + 2 if step else 1
        self._append(state, entry)
        logger.info("ddk step %d: weights %s (%.1fs)", state.global_step, weights, seconds)

    def _measure(self, model: nn.Module) -> tuple[dict, dict, float]:
        """(domain -> gap, domain -> the student's figure, seconds) on the held-out data (teacher: once)."""
        began = time.perf_counter()
        if self.saved.teacher is None:
            self.saved.teacher = self._teacher_figures()
        kl = self.cfg.gap == "kl"
        student = {d: _figures(model, ds, self._teacher_of(d) if kl else None, self.batch_size)
                   for d, ds in self.heldout.items()}  # fmt: skip
        gaps = domain_gaps(student, self.saved.teacher, self.cfg.gap)
        figures = {d: s[_GAP_KEY[self.cfg.gap]] for d, s in student.items()}
        return gaps, figures, time.perf_counter() - began

    def _entry(self, step: int, rule: str, gaps: dict, weights: dict, student: dict, seconds: float) -> dict:
        return {"step": step, "rule": rule, "gap": self.cfg.gap, "gaps": gaps, "weights": weights,
                "student": student, "teacher": self.saved.teacher, "seconds": seconds}  # fmt: skip

    def _append(self, state, entry: dict) -> None:
        if state.is_world_process_zero:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _teacher_figures(self) -> dict[str, float] | None:
        """The teacher's per-domain ppl or bpb on the held-out data (None for gap=kl: KL needs no such figure)."""
        if self.cfg.gap == "kl":
            return None
        key = _GAP_KEY[self.cfg.gap]
        if not isinstance(self.teacher, TeacherSet):
            wrapped = _TeacherModel(self.teacher)
            return {d: _figures(wrapped, ds, None, self.batch_size)[key] for d, ds in self.heldout.items()}
        # several teachers: each domain against its own teachers, their figures averaged in log space by share
        # (ppl: a geometric mean; bpb is already a log): the teachers the domain is distilled from
        figures = {}
        for d, ds in self.heldout.items():
            shares = self.teacher.shares(d)
            logs = {k: _figures(_TeacherModel(self.teacher.members[k]), ds, None, self.batch_size)[key] for k in shares}
            mean = sum(shares[k] * (math.log(v) if key == "ppl" else v) for k, v in logs.items())
            figures[d] = math.exp(mean) if key == "ppl" else mean
        return figures

    def _teacher_of(self, domain: str) -> OnlineTeacher:
        """The teacher a domain's KL gap is measured against (several teachers: its one teacher, `setup_mixing`)."""
        if not isinstance(self.teacher, TeacherSet):
            return self.teacher
        return self.teacher.members[next(iter(self.teacher.shares(domain)))]


def _figures(model: nn.Module, dataset, teacher: OnlineTeacher | None, batch_size: int) -> dict:
    return evaluate(model, dataset, teacher=teacher, batch_size=batch_size, progress=False)["overall"]


class _TeacherModel(nn.Module):
    """An `OnlineTeacher` seen as a causal LM (`.logits` over the student's vocabulary), for `evaluate`."""

    def __init__(self, teacher: OnlineTeacher):
        super().__init__()
        self.teacher = teacher
        self.inner = teacher.model  # registered so evaluate() finds its device and parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.teacher.logits(input_ids, attention_mask))


def _same_on_all_ranks(weights: dict[str, float]) -> dict[str, float]:
    """Rank 0's weights everywhere (each rank measured the same model; this rules out float drift)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return weights
    box = [weights]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---- setup: run_distill calls this when data.mixing is set ----


@dataclass
class Mixing:
    """What `setup_mixing` built; `attach(trainer)` plugs it into a `DistillTrainer`."""

    train_ds: object
    sampler: DomainSampler
    callback: MixingCallback

    def attach(self, trainer) -> None:
        """Make the trainer draw from the sampler, checkpoint its state, and not skip batches on resume."""
        trainer.domain_sampler = self.sampler
        trainer.args.ignore_data_skip = True  # the sampler seeks to the consumed draws itself
        self.callback.handler = trainer.callback_handler
        trainer.add_callback(MixingState())
        # First in line: its on_log adds the weights before the loggers write the entry.
        trainer.callback_handler.callbacks.insert(0, self.callback)


def setup_mixing(
    cfg: DistillConfig, train_ds, eval_ds, teacher: OnlineTeacher | TeacherSet | None, out: Path
) -> Mixing:
    """Check the domains, split held-out data, build the sampler and the callback.

    Args:
        cfg: the run config (`data.mixing` set).
        train_ds: packed training sequences (a `PackedDataset`).
        eval_ds: packed `data.eval` sequences, or None.
        teacher: the online teacher, or several (DDK: each domain's gap against its own teachers; None: CE only).
        out: the run directory.

    Returns:
        A `Mixing` whose `train_ds` has the held-out sequences removed when they were carved from it.

    Raises:
        UserError: unknown / missing domains in `weights`, ddk without a teacher, a training domain without
            held-out data, or one too small to give up its held-out split.
    """
    mix, t = cfg.data.mixing, cfg.train
    domains = train_ds.domain_names
    if mix.mode == "fixed":
        check_weights(mix.weights, domains, "config: data.mixing.weights")
    elif mix.weights:
        raise UserError(f"config: data.mixing.weights: only used with mode fixed (mode is {mix.mode})")
    heldout = {}
    if mix.mode == "ddk":
        if teacher is None:
            raise UserError("config: data.mixing.mode=ddk: needs an online teacher (model.teacher, loss.alpha > 0)")
        several = next((d for d in domains if isinstance(teacher, TeacherSet) and len(teacher.shares(d)) > 1), None)
        if mix.gap == "kl" and several is not None:
            raise UserError(
                f"config: data.mixing.gap=kl: domain {several!r} is distilled from several teachers; the KL gap is"
                " measured against one (route each domain to one teacher, or use gap ppl, logppl or bpb)"
            )
        train_ds, heldout = split_heldout(train_ds, eval_ds, mix.eval_tokens, cfg.data.eval)
    sizes = {d: train_ds.domains.count(d) for d in domains}
    draws = t.max_steps * t.batch_size * t.grad_accum * world_size()
    sampler = DomainSampler(train_ds.domains, static_weights(mix.mode, sizes, mix.weights), draws, seed=t.seed)
    return Mixing(train_ds, sampler, MixingCallback(sampler, mix, heldout, teacher, out, t.batch_size))
