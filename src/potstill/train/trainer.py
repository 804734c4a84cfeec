"""Online knowledge distillation with `transformers.Trainer`: `DistillTrainer` and `run_distill` (`potstill distill`).

The student trains on `alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)` (see
`potstill.losses`). The teacher is either an `OnlineTeacher` (frozen, same device, run under no-grad on the
student's batch; `teacher.source: online`) or a teacher cache (`teacher.source: cache`): top-k targets read
per packed-sequence index (`IndexedDataset` adds the index to each item), no teacher model in memory, the
loss on them through `losses/sparse.py` (`loss.sparse_tail`). Everything else (optimizer, scheduler, grad
accumulation, checkpoints, resume, DDP/FSDP/DeepSpeed through accelerate) is the stock Trainer.

Loss path: by default (`loss.fused: true`) the fused chunked loss (`losses/fused.py`): the student runs with
`logits_to_keep=1` (no [B, L, V] logits), its final hidden states and head weight go to `fused_kd_terms`
with the teacher as `TeacherHead` (online) or `SparseTargets` (cache). The dense path (full logits,
`kd_terms` / `sparse_kd_terms`) runs instead when `loss.fused: false`, when the student's head is not a
plain linear layer (`head_of` is None), when the online teacher's is not (`head_inputs` is None), or under
FSDP/DeepSpeed (sharded weights). Both give the same loss and gradients (tests/test_trainer_fused.py).

Normalization: both terms are summed over the scored (shifted, label != -100) positions of the whole
optimizer step and divided once by their global count, across gradient accumulation and ranks. So
grad_accum 1x8 == 8x1 and world size 2 == 1 exactly (up to float summation order).

Logged every `logging_steps` (to `OUT/log.jsonl` and stdout): `loss`, `kd`, `ce`, their weighted
parts `kd_weighted = alpha T^2 kd`, `ce_weighted = (1 - alpha) ce`, `alpha`, `grad_ratio =
||grad(alpha T^2 kd)|| / ||grad((1 - alpha) ce)||`, `learning_rate`, `grad_norm`. The ratio costs two
extra backward passes through the student on the first micro-batch of each logging step only.

`alpha: auto` picks alpha once, on the first micro-batch of step 1, so the two weighted gradient norms
are equal: alpha = g_ce / (T^2 g_kd + g_ce) with g = ||grad|| of the unweighted kd and ce (averaged
over ranks). It is then fixed, saved in checkpoints (resume keeps it) and in `OUT/summary.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from potstill.config import DistillConfig, LossConfig, dump_config
from potstill.errors import UserError
from potstill.fileio import write_json_atomic, write_text_atomic
from potstill.losses import combine, kd_terms
from potstill.losses.fused import TeacherHead, fused_kd_terms
from potstill.models.heads import head_of
from potstill.losses.sparse import SparseTargets, sparse_kd_terms
from potstill.models.load import quiet_hf_progress
from potstill.teacher.online import OnlineTeacher

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
RATIO_WARN = 0.01
# Files a potstill run directory may hold; anything else makes the directory "foreign".
_RUN_FILES = {CONFIG_FILE, LOG_FILE, SUMMARY_FILE, "eval.json", "student", "mixing.jsonl", "mixing_report.md", "plots"}


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
        if state.is_world_process_zero and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            write_text_atomic(self.path, "".join(line for line in lines if _logged_step(line) <= state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        entry = {"step": state.global_step, **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float) and k != "epoch")
        print(f"step {state.global_step}/{state.max_steps} {shown}", flush=True)


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


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
        teacher: the frozen online teacher, or None (CE only, or a cache).
        loss_cfg: divergence, alpha (float or "auto"), temperature, divergence parameters, fused/chunk_size.
        teacher_cache: an object with `.targets(indices [B]) -> SparseTargets [B, L, k]` (a `TeacherCache`)
            used instead of `teacher`; batches then need `index` [B] (wrap the dataset in `IndexedDataset`).
        **kwargs: passed to `transformers.Trainer`.
    """

    # compute_loss divides by the global token count of the optimizer step: the Trainer must not rescale.
    loss_is_scaled_for_ga = True
    # Set by `potstill.train.ddk.Mixing.attach` (data.mixing): draw training sequences by domain weights.
    domain_sampler = None

    def _get_train_sampler(self, train_dataset=None):
        return self.domain_sampler if self.domain_sampler is not None else super()._get_train_sampler(train_dataset)

    def __init__(self, *args, teacher: OnlineTeacher | None, loss_cfg: LossConfig, teacher_cache=None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is None and teacher_cache is None and loss_cfg.alpha != 0:
            raise UserError("model.teacher: required unless loss.alpha=0 (CE only)")
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        if teacher is not None:
            teacher.model.to(self.args.device)
        self.loss_cfg = loss_cfg
        self.add_callback(AlphaState(None if loss_cfg.alpha == "auto" else float(loss_cfg.alpha)))
        self._sums = torch.zeros(2, dtype=torch.float64)  # kd, ce summed over the steps since the last log
        self._steps = 0  # optimizer steps since the last log
        self._micro = 0  # micro-batch index inside the current optimizer step
        self._norms: torch.Tensor | None = None  # unweighted [||grad kd T^2||, ||grad ce||] of this log interval
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

        kd_terms shifts (logits[:, :-1] predict labels[:, 1:]), so the count is over `labels[:, 1:] != -100`.

        Returns:
            (micro-batches, global count as a 0-dim long tensor on `device`).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
        count = torch.as_tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        self._micro = 0
        self._steps += 1
        return batches, count

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
        head = self._student_head(model)
        teacher = self._teacher_view(inputs, fused=head is not None)
        if head is None or isinstance(teacher, torch.Tensor):
            terms, outputs = self._dense_terms(model, inputs, teacher, num_items_in_batch)
        else:
            terms, outputs = self._fused_terms(model, inputs, teacher, head, num_items_in_batch)
        if model.training:
            self._measure(model, terms)
        loss = combine(terms, self.alpha, self.loss_cfg.temperature)
        if model.training:
            parts = torch.stack([_value(terms.kd, terms.ce), terms.ce.detach().double()])
            self._sums = self._sums.to(parts.device) + parts  # stays on device: no sync per micro-step
            self._micro += 1
        if self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _student_head(self, model: nn.Module) -> tuple[torch.Tensor, float | None] | None:
        """(head weight [V, H], softcap) for the fused loss, or None for the dense path (see the module docstring)."""
        if not self.loss_cfg.fused or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        return head_of(self.accelerator.unwrap_model(model))

    def _teacher_view(self, inputs: dict[str, Any], fused: bool) -> TeacherHead | SparseTargets | torch.Tensor | None:
        """What the loss compares the student with on this batch (None: CE only).

        Returns:
            SparseTargets [B, L, k] (cache), TeacherHead with hidden [B, L, H] (online, fused), or teacher logits
            [B, L, V] (online, dense; also when the teacher's head cannot be chunked).
        """
        if self.loss_cfg.alpha == 0:
            return None
        if self.teacher_cache is not None:
            if "index" not in inputs:
                raise ValueError("DistillTrainer with a teacher cache: batches need 'index' (wrap in IndexedDataset)")
            targets = self.teacher_cache.targets(inputs["index"].cpu())
            return _to_device(targets, inputs["input_ids"].device)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        head = self.teacher.head_inputs(ids, mask) if fused else None
        return self.teacher.logits(ids, mask) if head is None else head

    def _dense_terms(self, model: nn.Module, inputs: dict[str, Any], teacher, num_tokens) -> tuple[Any, Any]:
        """KD terms from the student's full [B, L, V] logits (teacher: logits, SparseTargets or None)."""
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        if isinstance(teacher, SparseTargets):
            terms = sparse_kd_terms(outputs.logits, teacher, labels, self.loss_cfg, num_tokens=num_tokens)
        else:
            terms = kd_terms(outputs.logits, teacher, labels, self.loss_cfg, num_tokens=num_tokens)
        return terms, outputs

    def _fused_terms(self, model: nn.Module, inputs: dict[str, Any], teacher, head, num_tokens) -> tuple[Any, Any]:
        """KD terms from the student's final hidden states and head, chunk by chunk (never [B, L, V] logits).

        Goes through the (possibly DDP-wrapped) model's forward, so gradient synchronization works; the
        last hidden state HF returns is the one after the final norm, the head's input.
        """
        weight, softcap = head
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            output_hidden_states=True,
            logits_to_keep=1,
        )
        hidden = outputs.hidden_states[-1][:, :-1]  # position t predicts label t + 1
        if isinstance(teacher, TeacherHead):
            teacher = replace(teacher, hidden=teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1]))
        elif isinstance(teacher, SparseTargets):
            teacher = _shifted(teacher).flatten()
        alpha, temp2 = self.alpha, self.loss_cfg.temperature**2
        # Planned weights let the fused loss compute its gradient in the forward; a measuring micro-batch takes
        # separate kd / ce gradients first (retained graph), for which the fused backward recomputes anyway.
        planned = alpha is not None and not (teacher is not None and self._measuring(model))
        terms = fused_kd_terms(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            teacher,
            inputs["labels"][:, 1:].reshape(-1),
            self.loss_cfg,
            num_tokens=num_tokens,
            chunk_size=self.loss_cfg.chunk_size,
            softcap=softcap,
            loss_weights=(alpha * temp2, 1 - alpha) if planned else None,
        )
        return terms, outputs

    def _measuring(self, model: nn.Module) -> bool:
        """Whether this micro-batch measures the gradient norms: the first one of step 1 (auto) or of a logging step."""
        step = self.state.global_step + 1
        logging_step = step % self.args.logging_steps == 0 or step == self.state.max_steps
        return model.training and self._micro == 0 and (self.alpha is None or logging_step)

    def _measure(self, model: nn.Module, terms) -> None:
        """On the first micro-batch of step 1 (auto alpha) or of a logging step: the two gradient norms."""
        if terms.kd is None or not self._measuring(model):
            return
        auto = self.alpha is None
        temp2 = self.loss_cfg.temperature**2
        norms = _grad_norms(model, [temp2 * terms.kd, terms.ce])
        if self.args.world_size > 1:
            norms = self.accelerator.reduce(norms, reduction="mean")
        self._norms = norms.detach().cpu()
        if auto:
            g_kd, g_ce = self._norms.tolist()
            self._set_alpha(g_ce / (g_kd + g_ce) if g_kd + g_ce > 0 else 0.5)
            logger.warning("alpha: auto chose alpha=%.4g (grad norms: T^2 kd %.4g, ce %.4g)", self.alpha, g_kd, g_ce)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the KD/CE parts, alpha and the gradient-norm ratio to a training log; warn once if KD is negligible."""
        if "loss" in logs and self._steps > 0:
            sums = self._sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            kd, ce = (sums / self._steps).tolist()
            alpha, temp2 = self.alpha, self.loss_cfg.temperature**2
            logs.update(kd=kd, ce=ce, kd_weighted=(alpha or 0.0) * temp2 * kd, ce_weighted=(1 - (alpha or 0.0)) * ce)
            logs["alpha"] = alpha
            if self._norms is not None and alpha is not None:
                kd_norm, ce_norm = alpha * self._norms[0].item(), (1 - alpha) * self._norms[1].item()
                if ce_norm > 0:  # alpha = 1 (or nothing scored): no CE gradient to compare with
                    logs["grad_ratio"] = kd_norm / ce_norm
                    self._warn_if_negligible(logs["grad_ratio"])
            self._sums = torch.zeros_like(self._sums)
            self._steps, self._norms = 0, None
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


def _shifted(targets: SparseTargets) -> SparseTargets:
    """[B, L, k] targets -> [B, L - 1, k]: the positions that predict a next token."""
    return replace(targets, ids=targets.ids[:, :-1], logprobs=targets.logprobs[:, :-1], tail=targets.tail[:, :-1])


def _to_device(targets: SparseTargets, device: torch.device) -> SparseTargets:
    return replace(
        targets, ids=targets.ids.to(device), logprobs=targets.logprobs.to(device), tail=targets.tail.to(device)
    )


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


# ---- run_distill: `potstill distill` ----


def run_distill(cfg: DistillConfig) -> Path:
    """Train a student per `cfg` and write the run directory; resume it if it holds a checkpoint.

    `train.recipe: step_by_step` runs `potstill.train.step_by_step.run_step_by_step` instead (rationale records).

    Writes `OUT/config.yaml` (resolved), `OUT/log.jsonl`, `OUT/checkpoint-*`, `OUT/student/` (HF dir with
    tokenizer and id map), `OUT/eval.json` when `data.eval` is set, and `OUT/summary.json` last.

    Raises:
        UserError: bad model/data paths, mismatched vocabularies, an output dir that holds a finished or
            foreign run (without `train.overwrite`), or a resume with a different config.

    Returns:
        The run directory.
    """
    if cfg.train.recipe == "step_by_step":
        from potstill.train.step_by_step import run_step_by_step  # imports this module: import here

        return run_step_by_step(cfg)
    _check_config(cfg)
    with quiet_hf_progress():
        return _run(cfg)


def _run(cfg: DistillConfig) -> Path:
    """run_distill after the config checks: validate inputs, then train, save, evaluate, summarize."""
    out = Path(cfg.train.output_dir)
    resume = _plan_output_dir(out, cfg)
    student, tokenizer, teacher = _load_models(cfg)
    train_ds, eval_ds = _load_data(cfg, tokenizer)
    mixing = None
    if cfg.data.mixing is not None:
        from potstill.train.ddk import setup_mixing

        mixing = setup_mixing(cfg, train_ds, eval_ds, teacher, out)
        train_ds = mixing.train_ds
    cache = _open_cache(cfg, tokenizer, train_ds)
    from potstill.data import collate

    trainer = DistillTrainer(
        model=student,
        args=_training_args(cfg),
        train_dataset=train_ds if cache is None else IndexedDataset(train_ds),
        data_collator=collate,
        teacher=teacher,
        teacher_cache=cache,
        loss_cfg=cfg.loss,
        callbacks=[JsonlLogger(out / LOG_FILE)],
    )
    trainer.remove_callback(PrinterCallback)
    if mixing is not None:
        mixing.attach(trainer)
    if trainer.is_world_process_zero():
        _start_run_dir(out, cfg, resume)
    trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    _save_student(trainer, out / "student", tokenizer, cfg.model.student)
    if eval_ds is not None and trainer.is_world_process_zero():
        _write_eval(trainer, eval_ds, teacher, cfg, out)
    if trainer.is_world_process_zero():
        summary = {
            "alpha": trainer.alpha,
            "alpha_rule": "auto" if cfg.loss.alpha == "auto" else "fixed",
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
        }
        write_json_atomic(out / SUMMARY_FILE, summary)
    trainer.accelerator.wait_for_everyone()
    return out


def _check_config(cfg: DistillConfig) -> None:
    """What the config alone can tell, before any model is loaded."""
    if cfg.loss.alpha != 0 and cfg.teacher.source == "online" and cfg.model.teacher is None:
        raise UserError("config: model.teacher: required unless loss.alpha=0 (CE only) or teacher.source=cache")
    if cfg.loss.alpha != 0 and cfg.teacher.source == "cache" and cfg.teacher.cache is None:
        raise UserError("config: teacher.cache: required with teacher.source=cache (a `potstill cache build` dir)")
    if not cfg.data.train:
        raise UserError("config: data.train: at least one JSONL file is required")


def _plan_output_dir(out: Path, cfg: DistillConfig) -> Path | None:
    """Decide (touching nothing) what to do with `out`: a checkpoint to resume from, or None for a fresh run."""
    if not out.exists() or cfg.train.overwrite:
        if out.exists() and (not out.is_dir() or Path.cwd().resolve().is_relative_to(out.resolve())):
            raise UserError(f"{out}: refusing to overwrite (not a run directory, or it contains the current directory)")
        return None
    if not out.is_dir():
        raise UserError(f"{out}: train.output_dir exists and is not a directory")
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if n not in _RUN_FILES and not _ours(n))
    if foreign:
        raise UserError(f"{out}: output dir holds other files ({foreign[0]}, ...); pass --overwrite or another dir")
    if SUMMARY_FILE in names:
        raise UserError(f"{out}: output dir holds a finished run; pass --overwrite to replace it")
    last = get_last_checkpoint(str(out))
    if last is None:
        return None  # interrupted before its first checkpoint: nothing to keep, start over
    _check_same_config(out / CONFIG_FILE, cfg)
    return Path(last)


def _ours(name: str) -> bool:
    """Checkpoints and the temp names of our atomic writes."""
    return name.startswith("checkpoint-") or (name.startswith(".") and name.endswith(".tmp"))


def _check_same_config(path: Path, cfg: DistillConfig) -> None:
    """A resumed run must use the config it started with (overwrite aside)."""
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    try:  # fields added to potstill since the run started take their defaults, as they did then
        old = DistillConfig.model_validate(old).model_dump(mode="json")
    except ValidationError:
        pass  # compared raw: the first differing field is named below
    new = cfg.model_dump(mode="json")
    for section, fields in new.items():
        for key, value in fields.items():
            if key != "overwrite" and old.get(section, {}).get(key) != value:
                raise UserError(
                    f"{path}: {section}.{key} was {old.get(section, {}).get(key)!r}, now {value!r}; "
                    "resume with the same config, or pass --overwrite"
                )


def _start_run_dir(out: Path, cfg: DistillConfig, resume: Path | None) -> None:
    """Rank 0: fresh run -> empty `out` (replacing an old one under overwrite) and write config.yaml."""
    if resume is not None:
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_text_atomic(out / CONFIG_FILE, dump_config(cfg))


def _load_models(cfg: DistillConfig):
    """Student (+ tokenizer), teacher (None when alpha=0) and the student's id map; checks vocabularies.

    Returns:
        (student, tokenizer, OnlineTeacher | None); the teacher reads the student's id map if it has one.
    """
    from potstill.models.load import load_model

    student, tokenizer = load_model(cfg.model.student, dtype=cfg.model.dtype)
    if cfg.loss.alpha == 0 or cfg.teacher.source == "cache":
        return student, tokenizer, None
    id_map = _load_id_map(cfg.model.student)
    from potstill.teacher.online import check_tokenizers

    teacher_model, teacher_tok = load_model(cfg.model.teacher, dtype=cfg.model.teacher_load_dtype)
    check_tokenizers(tokenizer, teacher_tok, id_map=id_map)
    _check_vocab_sizes(student, teacher_model, id_map, cfg)
    return student, tokenizer, OnlineTeacher(teacher_model, id_map=id_map)


def _open_cache(cfg: DistillConfig, tokenizer, train_ds):
    """The teacher cache for `teacher.source: cache` (None otherwise, or when alpha=0), checked against the run.

    `model.teacher` is optional here (it is never loaded); when given, the cache must have been built from it.

    Raises:
        UserError: no manifest, or a cache built for another tokenizer, other data, temperature or teacher.
    """
    if cfg.teacher.source != "cache" or cfg.loss.alpha == 0:
        return None
    from potstill.teacher.cache import TeacherCache, dataset_fingerprint

    cache = TeacherCache(cfg.teacher.cache)
    fingerprint = dataset_fingerprint(train_ds)
    cache.check(
        tokenizer=tokenizer,
        dataset_fingerprint=fingerprint,
        temperature=cfg.loss.temperature,
        teacher=cfg.model.teacher,
    )
    return cache


def _load_id_map(student_dir: str) -> torch.Tensor | None:
    try:
        from potstill.models.vocab import load_id_map
    except ImportError:  # students with a trimmed vocabulary need potstill.student.init
        return None
    return load_id_map(student_dir)


def _check_vocab_sizes(student: nn.Module, teacher: nn.Module, id_map: torch.Tensor | None, cfg: DistillConfig):
    """The teacher's logits must cover exactly the student's output rows."""
    s_rows = student.get_output_embeddings().weight.shape[0]
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if id_map is not None:
        if len(id_map) != s_rows or int(id_map.max()) >= t_rows:
            raise UserError(
                f"{cfg.model.student}: potstill_vocab.json maps {len(id_map)} ids, the student has {s_rows}"
            )
    elif s_rows != t_rows:
        raise UserError(
            f"{cfg.model.teacher}: teacher vocabulary has {t_rows} ids, student {cfg.model.student} has {s_rows} "
            "(they must share a tokenizer, or the student must carry potstill_vocab.json)"
        )


def _load_data(cfg: DistillConfig, tokenizer):
    """Packed train dataset (required) and eval dataset (None when `data.eval` is empty)."""
    from potstill.data import load_dataset

    d = cfg.data
    train = load_dataset(d.train, tokenizer, d.seq_len, d.add_bos, False)
    if len(train) == 0:
        raise UserError(f"{d.train[0]}: no training text (after packing to {d.seq_len} tokens)")
    evals = load_dataset(d.eval, tokenizer, d.seq_len, d.add_bos, False) if d.eval else None
    return train, evals


def _training_args(cfg: DistillConfig) -> TrainingArguments:
    """Map the `train` section onto TrainingArguments (quiet, CPU-friendly, seeded, gloo on CPU)."""
    t = cfg.train
    return TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if _distributed() and not torch.cuda.is_available() else None,
        use_cpu=not torch.cuda.is_available(),
        bf16=t.mixed_precision == "bf16" or cfg.model.dtype == "bfloat16",
        fp16=t.mixed_precision == "fp16",
        restore_callback_states_from_checkpoint=True,
        ddp_find_unused_parameters=False,
    )


def _distributed() -> bool:
    """Launched by torchrun / accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _save_student(trainer: DistillTrainer, dest: Path, tokenizer, student_dir: str) -> None:
    """Save the trained student as a plain HF dir (weights, tokenizer, id map) via a temp dir, then rename."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # collective under FSDP/DeepSpeed; writes on rank 0 only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp)
        vocab = Path(student_dir) / "potstill_vocab.json"
        if vocab.is_file():
            shutil.copy2(vocab, tmp / vocab.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)


def _write_eval(trainer: DistillTrainer, eval_ds, teacher: OnlineTeacher | None, cfg: DistillConfig, out: Path):
    from potstill.eval.metrics import evaluate, write_eval_json

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    result = evaluate(model, eval_ds, teacher=teacher, batch_size=cfg.train.batch_size, progress=False)
    write_eval_json(out, str(out / "student"), cfg.model.teacher, result)
