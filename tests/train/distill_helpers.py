"""What the training tests share besides fixtures: run options over `models_dir` / `ddk_dir`, a run's logs, ragged
batches, DistillTrainers on the tiny models and their one-step gradients, a run killed mid-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from potstill.config import DistillConfig, LossConfig, load_config
from potstill.teacher.online import OnlineTeacher
from potstill.train.recipes import run_distill
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer

VOCAB = 300  # len(tiny_tokenizer): the vocabulary of models_dir's student and teacher


def overrides_for(models_dir: Path, out: Path, *extra: str) -> list[str]:
    """`key=value` options of a small run into `out` (later options win)."""
    return [
        f"model.student={models_dir / 'student'}", f"model.teacher={models_dir / 'teacher'}",
        f"data.train=[{models_dir / 'train.jsonl'}]", "data.seq_len=16", f"train.output_dir={out}",
        "train.batch_size=2", "train.lr=0.003", "train.warmup_steps=0", "train.logging_steps=1",
        "loss.temperature=2.0", *extra,
    ]  # fmt: skip


def on_policy_opts(pair: tuple[Path, Path], prompts: Path, out: Path, *extra: str) -> list[str]:
    """`key=value` options of a small on-policy run of the tiny (student, teacher) pair on `prompts`, into `out`."""
    student, teacher = pair
    return [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train=[{prompts}]", "data.seq_len=40",
        f"train.output_dir={out}", "train.recipe=on_policy", "train.batch_size=3", "train.lr=0.003",
        "train.warmup_steps=0", "train.logging_steps=1", "loss.alpha=1.0", "on_policy.max_new_tokens=6", *extra,
    ]  # fmt: skip


def make_cfg(models_dir: Path, out: Path, *extra: str) -> DistillConfig:
    return load_config(None, overrides_for(models_dir, out, *extra))


def ddk_opts(root: Path, out: Path, *extra: str) -> list[str]:
    """`key=value` options of a small DDK run over `ddk_dir` into `out`."""
    return [
        f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
        f"data.train=[{root / 'train.jsonl'}]", f"data.eval=[{root / 'eval.jsonl'}]", "data.seq_len=16",
        f"train.output_dir={out}", "train.batch_size=2", "train.lr=0.003", "train.warmup_steps=0",
        "train.logging_steps=1", "train.max_steps=6", "data.mixing.mode=ddk", "data.mixing.interval=2",
        "data.mixing.eval_tokens=40", *extra,
    ]  # fmt: skip


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def read_mixing(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "mixing.jsonl").read_text().splitlines()]


def ragged_batch(n: int, seq: int = 12, vocab: int = VOCAB, seed: int = 0) -> dict:
    """n sequences with ragged masks: each row scores a different number of positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for row in range(n):
        labels[row, : 1 + row] = -100  # position 0 (BOS) and a prompt of growing length are not scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_trainer(models_dir: Path, tmp_path: Path, loss: LossConfig, teacher: OnlineTeacher | None, *overrides: str):
    cfg = make_cfg(models_dir, tmp_path / "run", *overrides)
    student = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    return DistillTrainer(model=student, args=training_args(cfg), teacher=teacher, loss_cfg=loss)


def online_teacher(models_dir: Path, cls=OnlineTeacher) -> OnlineTeacher:
    return cls(AutoModelForCausalLM.from_pretrained(models_dir / "teacher"))


def step_grads(trainer: DistillTrainer, micro_batches: list[dict]) -> list[torch.Tensor]:
    """Gradients after one optimizer step's worth of training_step calls (as the Trainer's loop makes them)."""
    trainer.model.zero_grad(set_to_none=True)
    batches, count = trainer.get_batch_samples(iter(micro_batches), len(micro_batches), trainer.args.device)
    for batch in batches:
        trainer.training_step(trainer.model, batch, count)
    return [p.grad.clone() for p in trainer.model.parameters()]


class _Crash(RuntimeError):
    pass


def interrupted_run(monkeypatch, cfg: DistillConfig, step: int) -> None:
    """run_distill that dies (like a killed job) when it is about to train step `step + 1`."""
    original = DistillTrainer.training_step

    def crash(self, *args, **kwargs):
        if self.state.global_step == step:
            raise _Crash
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DistillTrainer, "training_step", crash)
        with pytest.raises(_Crash):
            run_distill(cfg)


def pair_models(root: Path):
    """(student, teacher) loaded fresh from `root`."""
    return (AutoModelForCausalLM.from_pretrained(root / n) for n in ("student", "teacher"))


def loss_and_grads(trainer: DistillTrainer, batches: list[dict]) -> tuple[float, list[torch.Tensor]]:
    """One optimizer step's summed loss over `batches` (micro-batches) and the gradients it leaves."""
    trainer.model.zero_grad(set_to_none=True)
    got, count = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    losses = [trainer.training_step(trainer.model, b, count).item() for b in got]
    return sum(losses), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
