"""Distilling step-by-step (Hsieh et al. 2023): rationale records as two tasks, `L = L_label + lambda L_rationale`.

Each `{"input", "label", "rationale"}` record (from `potstill generate` mode `rationale`) becomes two
prompt/completion examples: `INPUT\\n[label]\\n` -> `LABEL` and `INPUT\\n[rationale]\\n` -> `RATIONALE`;
the loss covers the completion only. The task marker closes the prompt (the paper prefixes it) because a
too-long example is cut from the prompt's start (`potstill.data.pack`): the marker survives, the input's
start goes. `StepByStepDataset` keeps the pair together (one padded sequence per
task, built by `potstill.data.pack`), and `potstill.data.collate` stacks it into one batch holding both
tasks: `input_ids/attention_mask/labels` (label task) and `r_input_ids/r_attention_mask/r_labels`.
`potstill distill` runs this recipe with `train.recipe: step_by_step` (`StepByStepRecipe`, in `train.recipes`).

`StepByStepTrainer` is a `DistillTrainer`: the label task gets the usual objective (soft-label KD when a
white-box teacher and `loss.alpha > 0` are given, else CE) and the rationale task adds
`loss.rationale_weight * CE`, each normalized by its own global count of scored tokens. Inference uses
the label task only (`predict_labels`), so rationales cost nothing at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from potstill.config import DistillConfig
from potstill.data import collate, pack
from potstill.data.sources import Record
from potstill.errors import UserError
from potstill.eval.metrics import write_eval_json
from potstill.losses import kd_terms, scored_mask
from potstill.train.rundir import STUDENT_DIR
from potstill.train.setup import Models, training_args
from potstill.train.step import divergence
from potstill.train.trainer import DistillTrainer

LABEL_PREFIX, RATIONALE_PREFIX = "[label]", "[rationale]"
RATIONALE_FIELDS = ("input", "label", "rationale")


def task_prompt(prefix: str, text: str) -> str:
    """The prompt of one task: `INPUT`, a newline, the task marker `PREFIX`, a newline."""
    return f"{text}\n{prefix}\n"


def read_rationales(paths: list[str], fields: tuple[str, ...] = RATIONALE_FIELDS) -> list[dict[str, str]]:
    """The `fields` of every row of JSONL files (default: a training record `{"input", "label", "rationale"}`).

    Raises:
        UserError: a missing file, a bad line, or a row without one of `fields` (`file:line: missing field "x"`).
    """
    from potstill.teacher.generate import check_fields, parse_template, read_rows

    rows = read_rows(paths)
    check_fields(parse_template("", "train.recipe=step_by_step"), rows, required=fields)
    return [{key: str(row.data[key]) for key in fields} for row in rows]


class StepByStepDataset(Dataset):
    """Pairs of task sequences, one per rationale record.

    Item i: `input_ids`, `attention_mask`, `labels` [L] (label task), `r_input_ids`, `r_attention_mask`,
    `r_labels` [L] (rationale task), `domain` ("label"). Labels are -100 on the prompt and padding.
    """

    def __init__(self, records: list[dict[str, str]], tokenizer, seq_len: int, add_bos: bool = True):
        self.label = _one_row_each(records, "label", LABEL_PREFIX, tokenizer, seq_len, add_bos)
        self.rationale = _one_row_each(records, "rationale", RATIONALE_PREFIX, tokenizer, seq_len, add_bos)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rationale[i]
        item = {key: self.label[i][key] for key in ("input_ids", "attention_mask", "labels")}
        item.update(r_input_ids=r["input_ids"], r_attention_mask=r["attention_mask"], r_labels=r["labels"])
        return item | {"domain": "label"}


def _one_row_each(records, field: str, prefix: str, tokenizer, seq_len: int, add_bos: bool):
    """One packed row per record: `pack` never mixes domains, so a distinct domain per record keeps them apart."""
    docs = [
        Record(prompt=task_prompt(prefix, r["input"]), completion=r[field], domain=str(i))
        for i, r in enumerate(records)
    ]
    return pack(docs, tokenizer, seq_len, add_bos=add_bos)


class StepByStepTrainer(DistillTrainer):
    """DistillTrainer on the label task plus `rationale_weight * CE` on the rationale task (see module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._r_count: torch.Tensor | None = None
        self._r_sum = torch.zeros((), dtype=torch.float64)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """As DistillTrainer (label-task count), and the global count of scored rationale positions."""
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        r_count = torch.as_tensor(sum(scored_mask(b["r_labels"]).sum() for b in batches), device=device)
        if self.args.world_size > 1:
            r_count = self.accelerator.reduce(r_count, reduction="sum")
        self._r_count = r_count
        return batches, count

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        """Label-task objective (DistillTrainer) + lambda * rationale CE; each over its own token count."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        weight = self.loss_cfg.rationale_weight
        if weight and "r_input_ids" in inputs:
            r_out = model(input_ids=inputs["r_input_ids"], attention_mask=inputs["r_attention_mask"])
            count = self._r_count if model.training and num_items_in_batch is not None else None
            ce = kd_terms(r_out.logits, None, inputs["r_labels"], divergence(self.loss_cfg), num_tokens=count).ce
            if model.training:
                self._r_sum = self._r_sum.to(ce.device) + ce.detach().double()
            if self.args.world_size > 1 and count is not None:
                ce = ce * self.args.world_size
            loss = loss + weight * ce
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `rationale_ce` (mean per optimizer step since the last log) to training logs."""
        if "loss" in logs and self._steps > 0:
            logs["rationale_ce"] = float(self._r_sum) / self._steps
            self._r_sum = torch.zeros_like(self._r_sum)
        super().log(logs, start_time)


@dataclass
class _Rows:
    """The recipe's records: training rows, and held-out rows with gold labels (or None)."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]] | None


class StepByStepRecipe:
    """`train.recipe: step_by_step`: the two-task objective on rationale records (`data.train`).

    With `data.eval` (rows with `input` and gold `label`), `OUT/eval.json` holds the label accuracy of the label
    task (`label_accuracy`, also in `OUT/summary.json`).

    Raises (in `read`):
        UserError: a train row without input/label/rationale or an eval row without input/label (`file:line`);
            `data.mixing` or `teacher.source: cache` (not supported by this recipe).
    """

    def read(self, cfg: DistillConfig) -> _Rows:
        if cfg.data.mixing is not None or cfg.teacher_kind == "cache":
            raise UserError("config: train.recipe=step_by_step supports neither data.mixing nor teacher.source=cache")
        evals = read_rationales(cfg.data.eval, fields=("input", "label")) if cfg.data.eval else None
        return _Rows(read_rationales(cfg.data.train), evals)

    def trainer(self, cfg: DistillConfig, models: Models, out: Path, data: _Rows) -> StepByStepTrainer:
        return StepByStepTrainer(
            model=models.student,
            args=training_args(cfg),
            train_dataset=StepByStepDataset(data.train, models.tokenizer, cfg.data.seq_len, cfg.data.add_bos),
            data_collator=collate,
            teacher=models.teacher,
            loss_cfg=cfg.loss,
        )

    def finish(self, trainer: StepByStepTrainer, cfg: DistillConfig, models: Models, out: Path, data: _Rows) -> dict:
        if data.eval is None:
            return {}
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        scores = label_accuracy(model, models.tokenizer, data.eval, cfg.data.add_bos, cfg.train.batch_size)
        write_eval_json(out, str(out / STUDENT_DIR), cfg.model.teacher, {"overall": scores, "domains": {}})
        print(f"label accuracy on data.eval: {scores['label_accuracy']:.4f} ({scores['correct']}/{len(data.eval)})")
        return {"label_accuracy": scores["label_accuracy"]}


def label_accuracy(
    model, tokenizer, rows: list[dict[str, str]], add_bos: bool = True, batch_size: int = 16
) -> dict[str, float | int]:
    """Accuracy of the label task's greedy answers (`predict_labels`) against the gold labels.

    Answers compare as in the rationale filter (`same_label`: case, spaces, a final period, numbers as numbers).
    Generation stops one token after the longest gold label, so a right answer is never cut off.

    Returns:
        `{"examples", "correct", "label_accuracy"}`.
    """
    from potstill.teacher.generate import same_label

    max_tokens = 1 + max(len(tokenizer(r["label"], add_special_tokens=False)["input_ids"]) for r in rows)
    answers = predict_labels(model, tokenizer, [r["input"] for r in rows], max_tokens, batch_size, add_bos)
    correct = sum(same_label(a, r["label"]) for a, r in zip(answers, rows, strict=True))
    return {"examples": len(rows), "correct": correct, "label_accuracy": correct / len(rows)}


def predict_labels(
    model, tokenizer, inputs: list[str], max_tokens: int = 8, batch_size: int = 16, add_bos: bool = True
) -> list[str]:
    """Greedy label-task answers (`INPUT\\n[label]\\n`), first line of each, stripped."""
    from potstill.teacher.generate import hf_generate

    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
    prompts = [bos + task_prompt(LABEL_PREFIX, x) for x in inputs]
    params = {"temperature": 0.0, "max_tokens": max_tokens, "n": 1, "seed": 0}
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts, _, _, _ = hf_generate(model, tokenizer, prompts[start : start + batch_size], params)
        answers += [t[0].strip().split("\n")[0].strip() for t in texts]
    return answers
