"""What `potstill distill` runs: the recipe table and the one run lifecycle every recipe goes through.

`RECIPES` maps `train.recipe` to a `Recipe`. `run_distill(cfg)` checks the run directory, loads the models,
asks the recipe for its trainer, starts (or resumes) the run directory, trains, saves the student, lets the
recipe evaluate, and writes `summary.json` last, with barriers so that under torchrun every rank sees the run
directory ready before training and finished before it returns. A recipe only says what is its own:

- `read(cfg)`: checks and reads of its data files that need no model (before anything is loaded);
- `trainer(cfg, models, out, data)`: its datasets and its `DistillTrainer` (or subclass);
- `finish(trainer, cfg, models, out, data)`: rank 0 after training: evaluation files, and summary fields.

Recipes: `distill` (KD on text / prompt-completion rows, optional domain mixing and a teacher cache) and
`step_by_step` (`potstill.train.step_by_step`), `on_policy` (`potstill.train.on_policy`: the student learns on its
own samples, graded by the teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from potstill.config import DistillConfig
from potstill.errors import UserError
from potstill.fileio import disk_problem, write_json_atomic
from potstill.launch import check_engine
from potstill.models.load import quiet_hf_progress
from potstill.teacher.cross import CrossTokenizerTeacher
from potstill.teacher.several import TeacherSet
from potstill.train.hidden import detach_projections, hidden_plan
from potstill.train.on_policy import OnPolicyRecipe
from potstill.train.rundir import LOG_FILE, STUDENT_DIR, SUMMARY_FILE, resume_point, save_student, start_run_dir
from potstill.train.setup import Models, load_data, load_models, open_cache, training_args
from potstill.train.step_by_step import StepByStepRecipe
from potstill.train.stopping import GracefulStop
from potstill.train.trainer import DistillTrainer, IndexedDataset, JsonlLogger


class Recipe(Protocol):
    """One way of training a student (see the module docstring)."""

    def read(self, cfg: DistillConfig) -> Any: ...

    def trainer(self, cfg: DistillConfig, models: Models, out: Path, data: Any) -> DistillTrainer: ...

    def finish(self, trainer: DistillTrainer, cfg: DistillConfig, models: Models, out: Path, data: Any) -> dict: ...


@dataclass
class _KDData:
    """What the `distill` recipe built besides its trainer: the held-out data."""

    eval_ds: Any = None


class KDRecipe:
    """`train.recipe: distill`: soft-label KD (or CE only) on packed text / prompt-completion rows."""

    def read(self, cfg: DistillConfig) -> _KDData:
        return _KDData()

    def trainer(self, cfg: DistillConfig, models: Models, out: Path, data: _KDData) -> DistillTrainer:
        from potstill.data import collate

        train_ds, data.eval_ds = load_data(cfg, models.tokenizer)
        several = isinstance(models.teacher, TeacherSet)
        if several:
            models.teacher.check_domains(train_ds.domain_names)
        for teacher in models.teacher.members if several else [models.teacher]:
            if isinstance(teacher, CrossTokenizerTeacher):  # before the run directory exists: one line, no run
                teacher.tokens.check_context(train_ds.input_ids, train_ds.attention_mask, "data.train")
        mixing = None
        if cfg.data.mixing is not None:
            from potstill.train.mixing import setup_mixing

            # DDK with another tokenizer: refused (`train.setup.cross_tokenizer`)
            teacher = models.teacher if _same_ids(models.teacher) or isinstance(models.teacher, TeacherSet) else None
            mixing = setup_mixing(cfg, train_ds, data.eval_ds, teacher, out)
            train_ds = mixing.train_ds
        cache = open_cache(cfg, models.tokenizer, train_ds)
        plan = hidden_plan(cfg, models.student, models.teacher, train_ds) if _same_ids(models.teacher) else None
        trainer = DistillTrainer(
            model=models.student,
            args=training_args(cfg),
            train_dataset=train_ds if cache is None else IndexedDataset(train_ds),
            data_collator=collate,
            teacher=models.teacher,
            teacher_cache=cache,
            loss_cfg=cfg.loss,
            hidden=None if plan is None else (plan, cfg.hidden.weight),
        )
        if mixing is not None:
            mixing.attach(trainer)
        return trainer

    def finish(self, trainer: DistillTrainer, cfg: DistillConfig, models: Models, out: Path, data: _KDData) -> dict:
        if data.eval_ds is not None:
            from potstill.eval.metrics import evaluate, write_eval_json

            model = trainer.accelerator.unwrap_model(trainer.model).eval()
            # KL / agreement: at every position with the same ids, on the 1:1 aligned ones with another tokenizer;
            # none for several teachers (no single distribution to compare with)
            teacher = None if isinstance(models.teacher, TeacherSet) else models.teacher
            result = evaluate(model, data.eval_ds, teacher=teacher, batch_size=cfg.train.batch_size, progress=False)
            write_eval_json(out, str(out / STUDENT_DIR), cfg.model.teacher, result)
        return {"alpha": trainer.alpha, "alpha_rule": "auto" if cfg.loss.alpha == "auto" else "fixed"}


def _same_ids(teacher) -> bool:
    """Whether the run's teacher is one that scores the student's token ids (not None, not a teacher of another
    tokenizer, not several)."""
    return teacher is not None and not isinstance(teacher, (CrossTokenizerTeacher, TeacherSet))


RECIPES: dict[str, Recipe] = {"distill": KDRecipe(), "step_by_step": StepByStepRecipe(), "on_policy": OnPolicyRecipe()}


def run_distill(cfg: DistillConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Train a student per `cfg` (the recipe `train.recipe`) into its run directory; resume it if it holds a checkpoint.

    Writes `OUT/config.yaml` (resolved), `OUT/log.jsonl`, `OUT/checkpoint-*`, `OUT/student/` (HF dir with
    tokenizer and id map), the recipe's evaluation (`OUT/eval.json` when `data.eval` is set), and
    `OUT/summary.json` last.

    Args:
        cfg: the validated config.
        callbacks: extra Trainer callbacks (e.g. a clock for `potstill.plan.measure_run`).

    Raises:
        UserError: bad model/data paths, mismatched vocabularies, an output dir that holds a finished or
            foreign run (without `train.overwrite`), or a resume with a different config.

    Returns:
        The run directory.
    """
    recipe = RECIPES[cfg.check_runnable().train.recipe]
    check_engine(gpus=torch.cuda.is_available())
    data = recipe.read(cfg)
    out = Path(cfg.train.output_dir)
    with quiet_hf_progress():
        resume = resume_point(out, cfg)
        models = load_models(cfg)
        trainer = recipe.trainer(cfg, models, out, data)
        trainer.remove_callback(PrinterCallback)
        stop = GracefulStop()
        for callback in (JsonlLogger(out / LOG_FILE), stop, *callbacks):
            trainer.add_callback(callback)
        if trainer.is_world_process_zero():
            start_run_dir(out, cfg, resume)
        trainer.accelerator.wait_for_everyone()
        try:
            with stop:
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            if stop.signum and trainer.state.global_step < trainer.state.max_steps:
                step = trainer.state.global_step
                raise stop.stopped(f"after step {step} (saved {out}/checkpoint-{step})")
            detach_projections(trainer.accelerator.unwrap_model(trainer.model))
            save_student(trainer, out / STUDENT_DIR, models.tokenizer, cfg.model.student)
        except Exception as err:  # a checkpoint cut short by a full disk: the rerun resumes from the last whole one
            problem = disk_problem(err, out)
            if problem is None:
                raise
            raise UserError(problem) from None
        if trainer.is_world_process_zero():
            summary = {"recipe": cfg.train.recipe, "global_step": trainer.state.global_step}
            # how it ran: accelerate's engine (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED) and the processes
            summary["engine"] = {
                "type": trainer.accelerator.distributed_type.value,
                "processes": trainer.args.world_size,
            }
            summary |= {"train_loss": result.training_loss, **recipe.finish(trainer, cfg, models, out, data)}
            write_json_atomic(out / SUMMARY_FILE, summary)
        trainer.accelerator.wait_for_everyone()
    return out
