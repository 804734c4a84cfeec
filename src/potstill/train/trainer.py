"""`DistillTrainer`: a `transformers.Trainer` whose loss is the KD objective (`potstill distill`'s trainer).

The student trains on `alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)` (see
`potstill.losses`), one micro-batch at a time through `potstill.train.step` (the KD step). The teacher is either
an `OnlineTeacher` (frozen, same device, run under no-grad on the student's batch; `teacher.source: online`) or a
teacher cache (`teacher.source: cache`): top-k targets read per packed-sequence index (`IndexedDataset` adds the
index to each item), no teacher model in memory, the loss on them through `losses/sparse.py`
(`loss.sparse_tail`). Everything else (optimizer, scheduler, grad accumulation, checkpoints, resume,
DDP/FSDP/DeepSpeed through accelerate) is the stock Trainer.

Loss path: by default (`loss.fused: true`) the fused chunked loss (`losses/fused.py`, no [B, L, V] logits). The
dense path (full logits) runs instead when `loss.fused: false`, when the student's head is not a plain linear
layer (`models.heads.head_of` is None), when the online teacher's is not, or under FSDP/DeepSpeed (sharded
weights). Both give the same loss and gradients (tests/train/test_trainer_fused.py).

Normalization: both terms are summed over the scored positions (`losses.scored_mask`) of the whole optimizer
step and divided once by their global count, across gradient accumulation and ranks. So grad_accum 1x8 == 8x1
and world size 2 == 1 exactly (up to float summation order).

Logged every `logging_steps` (to `OUT/log.jsonl` and stdout): `loss`, `kd`, `ce`, their weighted
parts `kd_weighted = alpha T^2 kd`, `ce_weighted = (1 - alpha) ce`, `alpha`, `grad_ratio =
||grad(alpha T^2 kd)|| / ||grad((1 - alpha) ce)||`, `learning_rate`, `grad_norm`. The ratio costs two
extra backward passes through the student on the first micro-batch of each logging step only. With intermediate-layer
distillation (`hidden.weight > 0`, `potstill.train.hidden`) the loss gains `w * hidden`; logged as `hidden`,
`hidden_weighted` and `hidden_grad_ratio = ||grad(w hidden)|| / ||grad(alpha T^2 kd)||` (one more backward).

`alpha: auto` picks alpha once, on the first micro-batch of step 1, so the two weighted gradient norms
are equal: alpha = g_ce / (T^2 g_kd + g_ce) with g = ||grad|| of the unweighted kd and ce (averaged
over ranks). It is then fixed, saved in checkpoints (resume keeps it) and in `OUT/summary.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from potstill.config import LossConfig
from potstill.errors import UserError
from potstill.losses import KDTerms, combine, kd_weights, scored_mask
from potstill.teacher.cross import CrossTokenizerTeacher
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.scoring import EndpointScorer
from potstill.teacher.several import TeacherSet
from potstill.train.hidden import HiddenPlan
from potstill.train.rundir import truncate_log
from potstill.train.step import kd_micro_step

logger = logging.getLogger(__name__)

RATIO_WARN = 0.01


class AlphaState(TrainerCallback, ExportableState):
    """Holds the KD weight; stored in every checkpoint's trainer_state.json so a resumed run keeps an auto alpha.

    Args:
        alpha: the weight in [0, 1], or None while `alpha: auto` has not chosen it yet.
    """

    def __init__(self, alpha: float | None = None):
        self.alpha = alpha

    def state(self) -> dict:
        return {"args": {"alpha": self.alpha}, "attributes": {}}


class JsonlLogger(TrainerCallback):
    """Rank 0 appends each training log (one JSON object per logging step) to `OUT/log.jsonl` and prints it.

    Args:
        path: the log file; on resume, lines after the checkpoint's step are dropped (they are redone).
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            truncate_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        entry = {"step": state.global_step, **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float) and k != "epoch")
        print(f"step {state.global_step}/{state.max_steps} {shown}", flush=True)


class IndexedDataset(torch.utils.data.Dataset):
    """A dataset whose items also carry their position (`index`, 0-dim long), to look up cached teacher targets.

    Args:
        dataset: e.g. a `PackedDataset` (items are dicts).
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "index": torch.tensor(i)}


class DistillTrainer(Trainer):
    """A `Trainer` whose loss is the KD objective against an online teacher or a teacher cache.

    Args:
        *args: passed to `transformers.Trainer` (model = the student, args, train_dataset, data_collator...).
        teacher: the frozen online teacher, several (`TeacherSet`, `model.teachers`), the endpoint that scores for it
            (`teacher.source: endpoint`), or None (CE only, or a cache).
        loss_cfg: divergence, alpha (float or "auto"), temperature, divergence parameters, fused/chunk_size.
        teacher_cache: an object with `.targets(indices [B]) -> SparseTargets [B, L, k]` (a `TeacherCache`)
            used instead of `teacher`; batches then need `index` [B] (wrap the dataset in `IndexedDataset`).
        hidden: the intermediate-layer term (`potstill.train.hidden.hidden_plan`) and its weight, or None.
        **kwargs: passed to `transformers.Trainer`.
    """

    # compute_loss divides by the global token count of the optimizer step: the Trainer must not rescale.
    loss_is_scaled_for_ga = True
    # Set by `potstill.train.mixing.Mixing.attach` (data.mixing): draw training sequences by domain weights.
    domain_sampler = None

    def _get_train_sampler(self, train_dataset=None):
        return self.domain_sampler if self.domain_sampler is not None else super()._get_train_sampler(train_dataset)

    def __init__(
        self,
        *args,
        teacher: OnlineTeacher | TeacherSet | EndpointScorer | None,
        loss_cfg: LossConfig,
        teacher_cache=None,
        hidden: tuple[HiddenPlan, float] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if teacher is None and teacher_cache is None and loss_cfg.alpha != 0:
            raise UserError("model.teacher: required unless loss.alpha=0 (CE only)")
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        for member in teacher.members if isinstance(teacher, TeacherSet) else [teacher]:
            if isinstance(member, (OnlineTeacher, CrossTokenizerTeacher)):  # an endpoint teacher has no model here
                member.model.to(self.args.device)
        if hasattr(teacher_cache, "to"):  # a hidden-state cache's teacher head
            teacher_cache.to(self.args.device)
        self.loss_cfg = loss_cfg
        self.hidden, self.hidden_weight = hidden if hidden is not None else (None, 0.0)
        self.add_callback(AlphaState(None if loss_cfg.alpha == "auto" else float(loss_cfg.alpha)))
        self._sums = torch.zeros(3, dtype=torch.float64)  # kd, ce, hidden summed over the steps since the last log
        self._steps = 0  # optimizer steps since the last log
        self._stats: dict[str, float] = {}  # sums of the terms' stats (cross-tokenizer KD) since the last log
        self._stat_batches = 0
        self._micro = 0  # micro-batch index inside the current optimizer step
        # unweighted [||grad kd T^2||, ||grad ce||, ||grad hidden||] of this log interval
        self._norms: torch.Tensor | None = None
        self._warned = False

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """Autocast all of `compute_loss` under `train.mixed_precision`, not only the model's forward.

        accelerate wraps just `model.forward`; the fused loss computes the student's head outside it, and that
        head (the [tokens, V] matmuls) is most of the step's precision-sensitive time.
        """
        return self.accelerator.autocast()

    @property
    def alpha(self) -> float | None:
        """The KD weight in use (None until `alpha: auto` has chosen it on the first step)."""
        # The callback object is replaced when a checkpoint's callback states are restored: look it up.
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, AlphaState)).alpha

    def _set_alpha(self, value: float) -> None:
        next(cb for cb in self.callback_handler.callbacks if isinstance(cb, AlphaState)).alpha = value

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Fetch one optimizer step's micro-batches and count their scored positions over all ranks.

        Position t predicts label t + 1, so the count is over `scored_mask(labels)`.

        Returns:
            (micro-batches, global count as a 0-dim long tensor on `device`).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        batches = self.prepare_step(batches, device)
        count = sum(scored_mask(b["labels"]).sum() for b in batches)
        count = torch.as_tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        self._micro = 0
        self._steps += 1
        return batches, count

    def prepare_step(self, batches: list[dict], device: torch.device) -> list[dict]:
        """A recipe's hook on one optimizer step's micro-batches before their tokens are counted (as they are here;
        on-policy distillation replaces completions by the student's samples)."""
        return batches

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """KD objective for one micro-batch, normalized by the step's global count of scored positions.

        Args:
            model: the (possibly wrapped) student.
            inputs: `input_ids` [B, L], `attention_mask` [B, L], `labels` [B, L] (HF convention, unshifted);
                other keys (`n_bytes`, `domain`) are ignored.
            return_outputs: also return the student's outputs.
            num_items_in_batch: global count from `get_batch_samples` (None: this batch's own count).

        Returns:
            The scalar loss to backpropagate (times the world size: DDP averages gradients over ranks).
        """
        source = self.teacher_cache if self.teacher_cache is not None else self.teacher
        source = None if self.loss_cfg.alpha == 0 else source
        # Planned weights let the fused loss compute its gradient in the forward; a measuring micro-batch takes
        # separate kd / ce gradients first (retained graph), for which the fused backward recomputes anyway.
        planned = not (source is not None and self._measuring(model))
        terms, outputs = kd_micro_step(
            model,
            self.accelerator.unwrap_model(model),
            inputs,
            source,
            self.loss_cfg,
            self.alpha,
            num_items_in_batch,
            plan_weights=planned,
            dense=self.is_fsdp_enabled or self.is_deepspeed_enabled,
            hidden=self.hidden if source is not None else None,
        )
        return self.finish_loss(model, terms, outputs, return_outputs, num_items_in_batch)

    def finish_loss(self, model: nn.Module, terms: KDTerms, outputs, return_outputs: bool, num_items_in_batch):
        """From a micro-batch's two terms to the loss to backpropagate: gradient-norm measurement, weighting with
        alpha and T^2 (and the hidden-state weight), the sums for the logs, and the world-size factor (DDP averages
        gradients over ranks)."""
        if model.training:
            self._measure(model, terms)
        loss = combine(terms, self.alpha, self.loss_cfg.temperature, self.hidden_weight)
        if model.training:
            parts = [_value(terms.kd, terms.ce), terms.ce.detach().double(), _value(terms.hidden, terms.ce)]
            parts = torch.stack(parts)
            self._sums = self._sums.to(parts.device) + parts  # stays on device: no sync per micro-step
            for key, value in (terms.stats or {}).items():
                self._stats[key] = self._stats.get(key, 0.0) + value
            self._stat_batches += 1 if terms.stats else 0
            self._micro += 1
        if self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _measuring(self, model: nn.Module) -> bool:
        """Whether this micro-batch measures the gradient norms: the first one of step 1 (auto) or of a logging step."""
        step = self.state.global_step + 1
        logging_step = step % self.args.logging_steps == 0 or step == self.state.max_steps
        if self.alpha == 1.0 and self.hidden is None:  # no CE gradient to compare with: save the two backwards
            return False
        return model.training and self._micro == 0 and (self.alpha is None or logging_step)

    def _measure(self, model: nn.Module, terms: KDTerms) -> None:
        """On the first micro-batch of step 1 (auto alpha) or of a logging step: the two gradient norms."""
        if terms.kd is None or not self._measuring(model):
            return
        auto = self.alpha is None
        w_kd = kd_weights(1.0, self.loss_cfg.temperature)[0]  # T^2: the KD term's weight at alpha = 1
        norms = _grad_norms(model, [w_kd * terms.kd, terms.ce, *([] if terms.hidden is None else [terms.hidden])])
        if self.args.world_size > 1:
            norms = self.accelerator.reduce(norms, reduction="mean")
        self._norms = norms.detach().cpu()
        if auto:
            g_kd, g_ce = self._norms[:2].tolist()
            self._set_alpha(g_ce / (g_kd + g_ce) if g_kd + g_ce > 0 else 0.5)
            logger.warning("alpha: auto chose alpha=%.4g (grad norms: T^2 kd %.4g, ce %.4g)", self.alpha, g_kd, g_ce)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the KD/CE parts, alpha and the gradient-norm ratio to a training log; warn once if KD is negligible."""
        if "loss" in logs and self._steps > 0:
            sums = self._sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            kd, ce, hidden = (sums / self._steps).tolist()
            alpha = self.alpha
            w_kd, w_ce = kd_weights(alpha or 0.0, self.loss_cfg.temperature)
            logs.update(kd=kd, ce=ce, kd_weighted=w_kd * kd, ce_weighted=w_ce * ce)
            if self.hidden is not None:
                logs.update(hidden=hidden, hidden_weighted=self.hidden_weight * hidden)
            logs["alpha"] = alpha
            if self._norms is not None and alpha is not None:
                kd_norm, ce_norm = alpha * self._norms[0].item(), (1 - alpha) * self._norms[1].item()
                if ce_norm > 0:  # alpha = 1 (or nothing scored): no CE gradient to compare with
                    logs["grad_ratio"] = kd_norm / ce_norm
                    self._warn_if_negligible(logs["grad_ratio"])
                if len(self._norms) == 3 and kd_norm > 0:
                    logs["hidden_grad_ratio"] = self.hidden_weight * self._norms[2].item() / kd_norm
            stats, batches = self._stats, self._stat_batches
            if self.args.world_size > 1:  # every rank's micro-batches (all ranks log together)
                stats, batches = {}, 0
                for rank_stats, rank_batches in gather_object([(self._stats, self._stat_batches)]):
                    batches += rank_batches
                    for key, value in rank_stats.items():
                        stats[key] = stats.get(key, 0.0) + value
            if batches:  # mean per micro-batch of figures of the data (cross-tokenizer alignment)
                logs.update({key: value / batches for key, value in stats.items()})
            self._sums = torch.zeros_like(self._sums)
            self._steps, self._norms = 0, None
            self._stats, self._stat_batches = {}, 0
        super().log(logs, start_time)

    def _warn_if_negligible(self, ratio: float) -> None:
        if ratio < RATIO_WARN and not self._warned and self.is_world_process_zero():
            logger.warning(
                "KD term does almost nothing: ||grad(alpha T^2 kd)|| / ||grad((1-alpha) ce)|| = %.3g < %g "
                "(raise loss.alpha or loss.temperature, or use alpha: auto)",
                ratio,
                RATIO_WARN,
            )
            self._warned = True


def _value(term: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy of `term`, or 0 on `like`'s device when the term is absent (alpha = 0)."""
    return torch.zeros((), dtype=torch.float64, device=like.device) if term is None else term.detach().double()


def _grad_norms(model: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of the gradients of each scalar in `parts` w.r.t. the trainable parameters.

    Uses `torch.autograd.grad` (nothing is accumulated into `.grad`, no DDP hook fires); the graph is kept
    for the real backward. Cost: one extra backward pass per part.

    Returns:
        [len(parts)] float32 tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for part in parts:
        grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return torch.stack(norms)
