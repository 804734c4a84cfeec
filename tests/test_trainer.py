"""DistillTrainer and `potstill distill`: normalization invariance, alpha=0 / auto, logs, resume, run dirs, bad input.

Tiny random Llama models (student hidden 32, teacher 64, 2 layers) over conftest's 300-token BPE, built per module.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import build_tokenizer
from potstill.cli import main
from potstill.config import DistillConfig, LossConfig, load_config
from potstill.errors import UserError
from potstill.losses import combine, kd_terms
from potstill.teacher.online import OnlineTeacher
from potstill.train.recipes import run_distill
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer

VOCAB = 300  # len(tiny_tokenizer) from conftest
WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()


def tiny_model(path: Path, tokenizer, hidden: int, seed: int) -> Path:
    """Save a random 2-layer Llama of width `hidden` + `tokenizer` to `path` (an HF dir)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(lines):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n")
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A student (hidden 32), a bigger teacher (hidden 64), a model with another vocabulary, a corpus."""
    root = tmp_path_factory.mktemp("models")
    tiny_model(root / "student", tiny_tokenizer, 32, seed=0)
    tiny_model(root / "teacher", tiny_tokenizer, 64, seed=1)
    tiny_model(root / "other", build_tokenizer(vocab_size=280), 32, seed=2)
    write_corpus(root / "train.jsonl", 24)
    return root


def overrides_for(models_dir: Path, out: Path, *extra: str) -> list[str]:
    """`key=value` options of a small run into `out` (later options win)."""
    return [
        f"model.student={models_dir / 'student'}", f"model.teacher={models_dir / 'teacher'}",
        f"data.train=[{models_dir / 'train.jsonl'}]", "data.seq_len=16", f"train.output_dir={out}",
        "train.batch_size=2", "train.lr=0.003", "train.warmup_steps=0", "train.logging_steps=1",
        "loss.temperature=2.0", *extra,
    ]  # fmt: skip


def make_cfg(models_dir: Path, out: Path, *extra: str) -> DistillConfig:
    return load_config(None, overrides_for(models_dir, out, *extra))


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---- DistillTrainer unit tests (no run_distill) ----


class _Raises(OnlineTeacher):
    """A teacher that must never be asked for logits."""

    def logits(self, input_ids, attention_mask=None):
        raise AssertionError("teacher called")


def _batch(n: int, seq: int = 12, vocab: int = VOCAB, seed: int = 0) -> dict:
    """n sequences with ragged masks: each row scores a different number of positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for row in range(n):
        labels[row, : 1 + row] = -100  # position 0 (BOS) and a prompt of growing length are not scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _trainer(models_dir: Path, tmp_path: Path, loss: LossConfig, teacher: OnlineTeacher | None, *overrides: str):
    cfg = make_cfg(models_dir, tmp_path / "run", *overrides)
    student = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    return DistillTrainer(model=student, args=training_args(cfg), teacher=teacher, loss_cfg=loss)


def _teacher(models_dir: Path, cls=OnlineTeacher) -> OnlineTeacher:
    return cls(AutoModelForCausalLM.from_pretrained(models_dir / "teacher"))


def _step_grads(trainer: DistillTrainer, micro_batches: list[dict]) -> list[torch.Tensor]:
    """Gradients after one optimizer step's worth of training_step calls (as the Trainer's loop makes them)."""
    trainer.model.zero_grad(set_to_none=True)
    batches, count = trainer.get_batch_samples(iter(micro_batches), len(micro_batches), trainer.args.device)
    for batch in batches:
        trainer.training_step(trainer.model, batch, count)
    return [p.grad.clone() for p in trainer.model.parameters()]


def _reference_terms(models_dir: Path, teacher: OnlineTeacher, batch: dict, loss: LossConfig):
    """A fresh student and its KD terms on the whole batch, normalized by the batch's own count."""
    ref = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    logits = ref(input_ids=batch["input_ids"]).logits
    return ref, kd_terms(logits, teacher.logits(batch["input_ids"]), batch["labels"], loss)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_grad_accum_1x8_equals_8x1(models_dir, tmp_path, name):
    loss = LossConfig(name=name, alpha=0.7, temperature=2.0)
    teacher = _teacher(models_dir)
    batch = _batch(8)
    whole = _trainer(models_dir, tmp_path, loss, teacher, "train.batch_size=8")
    split = _trainer(models_dir, tmp_path, loss, teacher, "train.batch_size=1", "train.grad_accum=8")
    g_whole = _step_grads(whole, [batch])
    g_split = _step_grads(split, [{k: v[i : i + 1] for k, v in batch.items()} for i in range(8)])
    # Reference: the objective on the whole batch, normalized by its own count, straight through autograd.
    ref, terms = _reference_terms(models_dir, teacher, batch, loss)
    combine(terms, 0.7, 2.0).backward()
    for a, b, r in zip(g_whole, g_split, [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)


def test_alpha_zero_never_calls_teacher(models_dir, tmp_path):
    batch = _batch(2)
    trainer = _trainer(models_dir, tmp_path, LossConfig(alpha=0.0), _teacher(models_dir, _Raises))
    loss = trainer.compute_loss(trainer.model, batch)
    ce_only = _trainer(models_dir, tmp_path, LossConfig(alpha=0.0), None)
    logits = ce_only.model(input_ids=batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ce_only.compute_loss(ce_only.model, batch), expected)


def test_kd_without_teacher_is_a_user_error(models_dir, tmp_path):
    with pytest.raises(UserError, match="model.teacher"):
        _trainer(models_dir, tmp_path, LossConfig(alpha=0.5), None)


def _norm(model, scalar) -> float:
    grads = torch.autograd.grad(scalar, [p for p in model.parameters()], retain_graph=True)
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


def test_alpha_auto_equalizes_weighted_gradient_norms(models_dir, tmp_path):
    loss = LossConfig(alpha="auto", temperature=2.0)
    teacher = _teacher(models_dir)
    batch = _batch(4)
    trainer = _trainer(models_dir, tmp_path, loss, teacher, "train.logging_steps=5")
    assert trainer.alpha is None
    _step_grads(trainer, [batch])
    ref, terms = _reference_terms(models_dir, teacher, batch, loss)
    g_kd, g_ce = _norm(ref, 4.0 * terms.kd), _norm(ref, terms.ce)
    assert trainer.alpha == pytest.approx(g_ce / (g_kd + g_ce), rel=1e-5)
    assert 0 < trainer.alpha < 1
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["alpha"] == trainer.alpha and logs["grad_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_negligible_kd_term_warns_once(models_dir, tmp_path, caplog):
    trainer = _trainer(models_dir, tmp_path, LossConfig(alpha=1e-4), _teacher(models_dir))
    with caplog.at_level(logging.WARNING, logger="potstill.train.trainer"):
        for _ in range(2):
            _step_grads(trainer, [_batch(2)])
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


class _Crash(RuntimeError):
    pass


def _interrupted_run(monkeypatch, cfg: DistillConfig, step: int) -> None:
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


def test_resume_continues_exactly(models_dir, tmp_path, monkeypatch):
    opts = ("train.max_steps=6", "train.save_steps=3", "train.scheduler=cosine", "train.warmup_steps=2")
    full = run_distill(make_cfg(models_dir, tmp_path / "full", *opts))
    _interrupted_run(monkeypatch, make_cfg(models_dir, tmp_path / "resumed", *opts), step=4)
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
    _interrupted_run(monkeypatch, make_cfg(models_dir, tmp_path / "run", *opts), step=2)
    chosen = read_log(tmp_path / "run")[0]["alpha"]
    out = run_distill(make_cfg(models_dir, tmp_path / "run", *opts))
    assert {e["alpha"] for e in read_log(out)} == {chosen}
    assert json.loads((out / "summary.json").read_text())["alpha"] == chosen


# ---- bad input: one line on stderr, exit 2, nothing written ----


def _cli(*args: str) -> int:
    """Run `potstill distill ARGS` in-process; its exit status."""
    try:
        main(["distill", *args])
    except SystemExit as exc:
        return exc.code or 0
    return 0


def _cli_error(capsys, *args: str) -> str:
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("potstill: error: "), err
    return err[0]


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
def test_bad_config_is_one_line_and_writes_nothing(models_dir, tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    assert needle in _cli_error(capsys, *_cli_args(models_dir, out, override))
    assert not out.exists()


def test_vocabulary_mismatch_is_one_line(models_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = _cli_error(capsys, *_cli_args(models_dir, out, f"model.teacher={models_dir / 'other'}"))
    assert "tokenizers differ" in line
    assert not out.exists()


@pytest.mark.parametrize("content", ["foreign", "finished"])
def test_existing_output_dir_is_left_alone(models_dir, tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    name = "notes.txt" if content == "foreign" else "summary.json"
    (out / name).write_text("keep me")
    line = _cli_error(capsys, *_cli_args(models_dir, out))
    assert "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "keep me"


def test_overwrite_replaces_a_finished_run(models_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert _cli(*_cli_args(models_dir, out), "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 1


def test_resume_with_a_different_config_is_refused(models_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    opts = ("train.max_steps=2", "train.save_steps=1")
    _interrupted_run(monkeypatch, make_cfg(models_dir, out, *opts), step=1)
    before = sorted(p.name for p in out.iterdir())
    line = _cli_error(capsys, *overrides_for(models_dir, out, *opts, "loss.name=rkl"))
    assert "loss.name" in line
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_of_a_run_from_an_older_potstill_fills_new_fields_with_defaults(models_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    opts = ("train.max_steps=3", "train.save_steps=1")
    _interrupted_run(monkeypatch, make_cfg(models_dir, out, *opts), step=2)
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

PRESETS = sorted((Path(__file__).parents[1] / "src" / "potstill" / "configs").glob("*.yaml"))


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
