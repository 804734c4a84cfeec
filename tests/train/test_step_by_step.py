"""Step-by-step recipe: two-task dataset/collator masks, the two-task loss, tiny runs (API and CLI), bad input."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.config import DistillConfig, validate_config
from potstill.data import collate
from potstill.errors import UserError
from potstill.train.recipes import run_distill
from potstill.train.step_by_step import (
    StepByStepDataset,
    predict_labels,
    read_rationales,
)

RECORDS = [
    {"input": "2 + 3", "label": "5", "rationale": "2 plus 3 is 5."},
    {"input": "4 * 2", "label": "8", "rationale": "4 times 2 is 8."},
    {"input": "9 - 7", "label": "2", "rationale": "9 minus 7 is 2."},
]


def decode_scored(tok, ids, labels) -> str:
    return tok.decode(ids[labels != -100].tolist())


def test_collator_builds_both_tasks_with_the_right_masks(tiny_tokenizer):
    ds = StepByStepDataset(RECORDS, tiny_tokenizer, seq_len=48)
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["r_input_ids"].shape == (2, 48)
    eos = tiny_tokenizer.eos_token
    for i, rec in enumerate(RECORDS[:2]):
        # only the completion (+ eos) is scored; the prefix prompt, <bos> and padding are not
        assert decode_scored(tiny_tokenizer, batch["input_ids"][i], batch["labels"][i]) == rec["label"] + eos
        assert decode_scored(tiny_tokenizer, batch["r_input_ids"][i], batch["r_labels"][i]) == rec["rationale"] + eos
        prompt = tiny_tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist())
        assert prompt.startswith("<bos>" + rec["input"] + "\n[label]\n" + rec["label"])
        r_prompt = tiny_tokenizer.decode(batch["r_input_ids"][i][batch["r_attention_mask"][i].bool()].tolist())
        assert r_prompt.startswith("<bos>" + rec["input"] + "\n[rationale]\n" + rec["rationale"])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_an_input_too_long_for_seq_len_loses_its_start_not_the_task_marker(tiny_tokenizer):
    long_input = " ".join(f"w{i}" for i in range(200))
    ds = StepByStepDataset([{"input": long_input, "label": "yes", "rationale": "because"}], tiny_tokenizer, 48)
    for ids, mask, marker, answer in (
        ("input_ids", "attention_mask", "[label]", "yes"),
        ("r_input_ids", "r_attention_mask", "[rationale]", "because"),
    ):
        kept = tiny_tokenizer.decode(ds[0][ids][ds[0][mask].bool()].tolist())
        assert len(ds[0][ids]) == 48 and ds[0][mask].all()  # it did not fit: cut to seq_len
        assert "w0 " not in kept and kept.endswith(f"w199\n{marker}\n{answer}{tiny_tokenizer.eos_token}")


def cfg_for(tmp_path, student, train, **loss) -> DistillConfig:
    return validate_config(
        {
            "model": {"student": str(student)},
            "loss": {"alpha": 0.0, **loss},
            "data": {"train": [str(train)], "seq_len": 48},
            "train": {
                "recipe": "step_by_step",
                "output_dir": str(tmp_path / "run"),
                "max_steps": 12,
                "batch_size": 3,
                "lr": 3e-3,
                "warmup_steps": 0,
                "logging_steps": 4,
                "scheduler": "constant",
            },
        }
    )


def test_two_task_loss_is_label_plus_lambda_rationale(tiny_model_dir, write_jsonl, tmp_path):
    """Loss at step 1 with lambda = 2 equals CE_label + 2 CE_rationale, each from a float64 reference."""
    from potstill.models.load import load_model
    from potstill.train.setup import training_args
    from potstill.train.step_by_step import StepByStepTrainer

    train = write_jsonl("r.jsonl", RECORDS)
    cfg = cfg_for(tmp_path, tiny_model_dir, train, rationale_weight=2.0)
    model, tok = load_model(tiny_model_dir)
    ds = StepByStepDataset(RECORDS, tok, 48)
    trainer = StepByStepTrainer(
        model=model, args=training_args(cfg), train_dataset=ds, data_collator=collate, teacher=None, loss_cfg=cfg.loss
    )
    batch = collate([ds[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(model.eval(), batch)

    def ce(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        target = labels[:, 1:]
        keep = target != -100
        return torch.nn.functional.cross_entropy(logits[keep], target[keep])

    want = ce(batch["input_ids"], batch["attention_mask"], batch["labels"]) + 2 * ce(
        batch["r_input_ids"], batch["r_attention_mask"], batch["r_labels"]
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_run_trains_and_predicts_with_the_label_task(tiny_model_dir, write_jsonl, tmp_path):
    train = write_jsonl("r.jsonl", RECORDS)
    out = run_distill(cfg_for(tmp_path, tiny_model_dir, train))
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [entry["rationale_ce"] for entry in logs if "rationale_ce" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert json.loads((out / "summary.json").read_text())["global_step"] == 12
    from potstill.models.load import load_model

    model, tok = load_model(out / "student")
    answers = predict_labels(model, tok, [r["input"] for r in RECORDS], max_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_missing_rationale_field_names_file_and_line(write_jsonl):
    path = write_jsonl("r.jsonl", [RECORDS[0], {"input": "1 + 1", "label": "2"}])
    with pytest.raises(UserError, match=r'r.jsonl:2: missing field "rationale"'):
        read_rationales([str(path)])


STEP_BY_STEP_ARGS = (
    "train.recipe=step_by_step",
    "loss.alpha=0",
    "data.seq_len=48",
    "train.max_steps=25",
    "train.batch_size=4",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.logging_steps=5",
    "train.scheduler=constant",
)


def test_cli_step_by_step_trains_and_reports_label_accuracy(
    tiny_model_dir, write_jsonl, tmp_path, monkeypatch, run_cli
):
    """Every training label is "yes": the student learns to answer "yes", so an eval set of 3 "yes" and
    1 "no" rows scores 3/4, and the accuracy in eval.json/summary.json is that of the saved student."""
    train = write_jsonl("train.jsonl", [{**r, "label": "yes"} for r in RECORDS] * 4)
    gold = ["yes", "yes", "no", "YES."]  # compared as the rationale filter does: case and final period ignored
    evals = write_jsonl("eval.jsonl", [{"input": f"{i} + {i}", "label": g} for i, g in enumerate(gold)])
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model on 2 shared cores: threads only contend (6x slower)
    proc = run_cli(
        "distill",
        f"model.student={tiny_model_dir}",
        f"data.train=[{train}]",
        f"data.eval=[{evals}]",
        f"train.output_dir={out}",
        *STEP_BY_STEP_ARGS,
    )
    assert proc.returncode == 0, proc.stderr
    assert "label accuracy on data.eval: 0.7500 (3/4)" in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["overall"] == {"examples": 4, "correct": 3, "label_accuracy": 0.75}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "step_by_step" and summary["global_step"] == 25 and summary["label_accuracy"] == 0.75
    assert any("rationale_ce" in json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    from potstill.models.load import load_model

    model, tok = load_model(out / "student")
    assert predict_labels(model, tok, ["7 + 7", "1 + 1"], max_tokens=3) == ["yes", "yes"]


def test_cli_step_by_step_rejects_rows_that_are_not_rationale_records(
    tiny_model_dir, write_jsonl, tmp_path, distill_error
):
    """In-process (`potstill.cli.main`): the same one-line error path, without a subprocess's imports."""
    train = write_jsonl("train.jsonl", [RECORDS[0], {"text": "plain text, as for train.recipe=distill"}])
    out = tmp_path / "run"
    args = [f"model.student={tiny_model_dir}", f"data.train=[{train}]", f"train.output_dir={out}"]
    line = distill_error(*args, *STEP_BY_STEP_ARGS)
    assert "train.jsonl:2:" in line and 'missing field "input"' in line
    assert not out.exists()  # nothing written for a run that never started


def test_mixing_is_refused_before_anything_is_loaded(write_jsonl, tmp_path):
    train = write_jsonl("r.jsonl", RECORDS)
    cfg = cfg_for(tmp_path, tmp_path / "no-such-student", train)
    cfg.data.mixing = {"mode": "uniform"}
    with pytest.raises(UserError, match="step_by_step supports neither data.mixing"):
        run_distill(cfg)
