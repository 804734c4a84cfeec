"""DistillTrainer and `potstill distill`: normalization invariance, alpha=0 / auto, logs, resume, run dirs, bad input.

Tiny random Llama models (student hidden 32, teacher 64, 2 layers) over conftest's 300-token BPE, built per module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from distill_helpers import (
    VOCAB,
    interrupted_run,
    make_cfg,
    make_trainer,
    online_teacher,
    overrides_for,
    ragged_batch,
    read_log,
    step_grads,
)
from potstill.config import DistillConfig, LossConfig, load_config
from potstill.errors import UserError
from potstill.losses import combine, kd_terms
from potstill.teacher.online import OnlineTeacher
from potstill.train.recipes import run_distill
from potstill.train.trainer import DistillTrainer

# ---- DistillTrainer unit tests (no run_distill) ----


class _Raises(OnlineTeacher):
    """A teacher that must never be asked for logits."""

    def logits(self, input_ids, attention_mask=None):
        raise AssertionError("teacher called")


def _reference_terms(models_dir: Path, teacher: OnlineTeacher, batch: dict, loss: LossConfig):
    """A fresh student and its KD terms on the whole batch, normalized by the batch's own count."""
    ref = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    logits = ref(input_ids=batch["input_ids"]).logits
    return ref, kd_terms(logits, teacher.logits(batch["input_ids"]), batch["labels"], loss)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_grad_accum_1x8_equals_8x1(models_dir, tmp_path, name):
    loss = LossConfig(name=name, alpha=0.7, temperature=2.0)
    teacher = online_teacher(models_dir)
    batch = ragged_batch(8)
    whole = make_trainer(models_dir, tmp_path, loss, teacher, "train.batch_size=8")
    split = make_trainer(models_dir, tmp_path, loss, teacher, "train.batch_size=1", "train.grad_accum=8")
    g_whole = step_grads(whole, [batch])
    g_split = step_grads(split, [{k: v[i : i + 1] for k, v in batch.items()} for i in range(8)])
    # Reference: the objective on the whole batch, normalized by its own count, straight through autograd.
    ref, terms = _reference_terms(models_dir, teacher, batch, loss)
    combine(terms, 0.7, 2.0).backward()
    for a, b, r in zip(g_whole, g_split, [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)


def test_alpha_zero_never_calls_teacher(models_dir, tmp_path):
    batch = ragged_batch(2)
    trainer = make_trainer(models_dir, tmp_path, LossConfig(alpha=0.0), online_teacher(models_dir, _Raises))
    loss = trainer.compute_loss(trainer.model, batch)
    ce_only = make_trainer(models_dir, tmp_path, LossConfig(alpha=0.0), None)
    logits = ce_only.model(input_ids=batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ce_only.compute_loss(ce_only.model, batch), expected)


def test_kd_without_teacher_is_a_user_error(models_dir, tmp_path):
    with pytest.raises(UserError, match="model.teacher"):
        make_trainer(models_dir, tmp_path, LossConfig(alpha=0.5), None)


def _norm(model, scalar) -> float:
    grads = torch.autograd.grad(scalar, [p for p in model.parameters()], retain_graph=True)
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


def test_alpha_auto_equalizes_weighted_gradient_norms(models_dir, tmp_path):
    loss = LossConfig(alpha="auto", temperature=2.0)
    teacher = online_teacher(models_dir)
    batch = ragged_batch(4)
    trainer = make_trainer(models_dir, tmp_path, loss, teacher, "train.logging_steps=5")
    assert trainer.alpha is None
    step_grads(trainer, [batch])
    ref, terms = _reference_terms(models_dir, teacher, batch, loss)
    g_kd, g_ce = _norm(ref, 4.0 * terms.kd), _norm(ref, terms.ce)
    assert trainer.alpha == pytest.approx(g_ce / (g_kd + g_ce), rel=1e-5)
    assert 0 < trainer.alpha < 1
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["alpha"] == trainer.alpha and logs["grad_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_negligible_kd_term_warns_once(models_dir, tmp_path, caplog):
    trainer = make_trainer(models_dir, tmp_path, LossConfig(alpha=1e-4), online_teacher(models_dir))
    with caplog.at_level(logging.WARNING, logger="potstill.train.trainer"):
        for _ in range(2):
            step_grads(trainer, [ragged_batch(2)])
            logs = {"loss": 1.0}
            trainer.log(logs)
            assert 0 < logs["grad_ratio"] < 0.01
    assert sum("KD term does almost nothing" in r.message for r in caplog.records) == 1


# ---- run_distill ----


def test_smoke_run_loss_goes_down_and_writes_run_dir(models_dir, tmp_path):
    opts = ("train.max_steps=30", "train.logging_steps=10", f"data.eval=[{models_dir / 'train.jsonl'}]")
    out = run_distill(make_cfg(models_dir, tmp_path / "run", *opts))
    log = read_log(out)
    assert [e["step"] for e in log] == [10, 20, 30]
    assert log[-1]["loss"] < log[0]["loss"]
    for entry in log:
        assert entry["kd"] > 0 and entry["ce"] > 0 and entry["grad_ratio"] > 0 and entry["alpha"] == 0.5
        assert entry["loss"] == pytest.approx(entry["kd_weighted"] + entry["ce_weighted"], rel=1e-5)
        assert entry["kd_weighted"] == pytest.approx(0.5 * 4.0 * entry["kd"])
    assert load_config(out / "config.yaml") == make_cfg(models_dir, tmp_path / "run", *opts)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["alpha"] == 0.5
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.hidden_size == 32 and (out / "student" / "tokenizer.json").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert report["model"] == str(out / "student") and report["overall"]["kl_to_teacher"] >= 0
    assert 1 < report["overall"]["ppl"] < VOCAB  # trained: better than uniform over the vocabulary


def test_trimmed_vocab_student_trains_against_its_teacher(models_dir, tmp_path):
    from potstill.models.vocab import load_id_map
    from potstill.student.init import init_student

    texts = [json.loads(line)["text"] for line in (models_dir / "train.jsonl").read_text().splitlines()]
    student = init_student(models_dir / "teacher", 1, tmp_path / "trimmed", texts, calib_tokens=64, calib_seq_len=16)
    id_map = load_id_map(student)
    assert id_map is not None and len(id_map) < VOCAB
    out = run_distill(make_cfg(models_dir, tmp_path / "run", f"model.student={student}", "train.max_steps=3"))
    assert all(e["kd"] > 0 for e in read_log(out))
    assert torch.equal(load_id_map(out / "student"), id_map)


def test_resume_continues_exactly(models_dir, tmp_path, monkeypatch):
    opts = ("train.max_steps=6", "train.save_steps=3", "train.scheduler=cosine", "train.warmup_steps=2")
    full = run_distill(make_cfg(models_dir, tmp_path / "full", *opts))
    interrupted_run(monkeypatch, make_cfg(models_dir, tmp_path / "resumed", *opts), step=4)
    # checkpoint-3 exists, and the log already has step 4 (to be redone and rewritten)
    assert [e["step"] for e in read_log(tmp_path / "resumed")] == [1, 2, 3, 4]
    resumed = run_distill(make_cfg(models_dir, tmp_path / "resumed", *opts))

    assert read_log(resumed) == read_log(full)
    a = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_resume_keeps_auto_alpha(models_dir, tmp_path, monkeypatch):
    opts = ("loss.alpha=auto", "train.max_steps=4", "train.save_steps=2")
    interrupted_run(monkeypatch, make_cfg(models_dir, tmp_path / "run", *opts), step=2)
    chosen = read_log(tmp_path / "run")[0]["alpha"]
    out = run_distill(make_cfg(models_dir, tmp_path / "run", *opts))
    assert {e["alpha"] for e in read_log(out)} == {chosen}
    assert json.loads((out / "summary.json").read_text())["alpha"] == chosen


# ---- bad input: one line on stderr, exit 2, nothing written ----


def _cli_args(models_dir: Path, out: Path, *extra: str) -> list[str]:
    return overrides_for(models_dir, out, "train.max_steps=1", *extra)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.name=kl", "loss.name"),
        ("loss.beta=1.5", "loss.beta"),
        ("loss.alpha=-0.1", "loss.alpha"),
        ("loss.temperature=0", "loss.temperature"),
        ("train.bogus=1", "unknown key"),
        ("model.teacher=null", "model.teacher"),
        ("data.train=[]", "data.train"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(models_dir, tmp_path, distill_error, override, needle):
    out = tmp_path / "run"
    assert needle in distill_error(*_cli_args(models_dir, out, override))
    assert not out.exists()


def test_vocabulary_mismatch_is_one_line(models_dir, tmp_path, distill_error):
    out = tmp_path / "run"
    other = f"model.teacher={models_dir / 'other'}"
    line = distill_error(*_cli_args(models_dir, out, other, "loss.cross_tokenizer=never"))
    assert "tokenizers differ" in line
    assert not out.exists()


@pytest.mark.parametrize("content", ["foreign", "finished"])
def test_existing_output_dir_is_left_alone(models_dir, tmp_path, distill_error, content):
    out = tmp_path / "run"
    out.mkdir()
    name = "notes.txt" if content == "foreign" else "summary.json"
    (out / name).write_text("keep me")
    line = distill_error(*_cli_args(models_dir, out))
    assert "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "keep me"


def test_overwrite_replaces_a_finished_run(models_dir, tmp_path, run_main):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert run_main("distill", *_cli_args(models_dir, out), "--overwrite").returncode == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 1


def test_resume_with_a_different_config_is_refused(models_dir, tmp_path, distill_error, monkeypatch):
    out = tmp_path / "run"
    opts = ("train.max_steps=2", "train.save_steps=1")
    interrupted_run(monkeypatch, make_cfg(models_dir, out, *opts), step=1)
    before = sorted(p.name for p in out.iterdir())
    line = distill_error(*overrides_for(models_dir, out, *opts, "loss.name=rkl"))
    assert "loss.name" in line
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_of_a_run_from_an_older_potstill_fills_new_fields_with_defaults(models_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    opts = ("train.max_steps=3", "train.save_steps=1")
    interrupted_run(monkeypatch, make_cfg(models_dir, out, *opts), step=2)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["train"]["mixed_precision"]  # a field this run's potstill did not have yet
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    run_distill(make_cfg(models_dir, out, *opts))
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]


def test_bf16_teacher_and_autocast_student_train_like_float32(models_dir, tmp_path, monkeypatch):
    """teacher_dtype=bfloat16 runs the frozen teacher in bf16; mixed_precision=bf16 autocasts the student, whose
    weights stay float32. The losses follow the float32 run to bf16 precision (not exactly: the settings matter)."""
    seen = {}
    original = DistillTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen["teacher"] = next(self.teacher.model.parameters()).dtype
        seen["student"] = next(model.parameters()).dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return original(self, model, inputs, *args, **kwargs)

    opts = ("train.max_steps=3",)
    base = run_distill(make_cfg(models_dir, tmp_path / "fp32", *opts))
    monkeypatch.setattr(DistillTrainer, "compute_loss", spy)
    low = run_distill(make_cfg(models_dir, tmp_path / "bf16", *opts, "model.teacher_dtype=bfloat16",
                               "train.mixed_precision=bf16"))  # fmt: skip
    assert seen == {"teacher": torch.bfloat16, "student": torch.float32, "autocast": True}
    a, b = read_log(base), read_log(low)
    assert [r["kd"] for r in a] != [r["kd"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert y["kd"] == pytest.approx(x["kd"], rel=0.05) and y["ce"] == pytest.approx(x["ce"], rel=0.05)
    weights = AutoModelForCausalLM.from_pretrained(low / "student").state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())


# ---- presets ----

PRESETS = sorted((Path(__file__).parents[2] / "src" / "potstill" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path, tmp_path):
    if path.name == "demo.yaml":
        from potstill.demo import DemoFile, arm_config

        demo = load_config(path, model=DemoFile)
        for settings in (demo.full, demo.quick):
            for arm in ("kd", "ce"):
                assert arm_config(settings, arm, tmp_path, tmp_path / "teacher").train.max_steps > 0
    else:
        assert isinstance(load_config(path), DistillConfig)


def test_kd_default_yaml_matches_the_defaults():
    documented = load_config(PRESETS[0].with_name("kd_default.yaml")).model_dump()
    defaults = DistillConfig(model={"student": "s"}).model_dump()
    documented["model"].update(student="s", teacher=None)
    documented["data"]["train"] = []
    assert documented == defaults
