"""DistiLLM's parts of the on-policy recipe: the adaptive student-generated fraction, the replay buffer, and exact
resume with both (and the running baseline) carried in checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import interrupted_run
from potstill.config import load_config
from potstill.train.recipes import run_distill


@pytest.fixture
def files(tmp_path, make_model_dir, prompt_rows):
    rows = prompt_rows(15)
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:12]))
    held.write_text("".join(json.dumps(row) + "\n" for row in rows[12:]))
    return make_model_dir("student", seed=0), make_model_dir("teacher", seed=1), train, held


def _cfg(files, out, *extra):
    student, teacher, train, held = files
    opts = [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train=[{train}]", f"data.eval=[{held}]",
        "data.seq_len=40", f"train.output_dir={out}", "train.recipe=on_policy", "train.batch_size=3",
        "train.lr=0.003", "train.warmup_steps=0", "train.logging_steps=1", "loss.alpha=1.0", "loss.name=srkl",
        "on_policy.max_new_tokens=5", *extra,
    ]  # fmt: skip
    return load_config(None, opts, run=True)


def _run(files, out, *extra):
    run = run_distill(_cfg(files, out, *extra))
    return run, [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("threshold, rises", [(100.0, True), pytest.param(-100.0, False, marks=pytest.mark.slow)])
def test_adaptive_lambda_rises_when_the_validation_loss_stalls(files, tmp_path, threshold, rises):
    """threshold 100: every validation counts as stalled (lambda += 0.25 from the second one on); -100: none does."""
    _, logs = _run(
        files, tmp_path / "run", "train.max_steps=4", "on_policy.lmbda=0.0", "on_policy.adaptive=true",
        "on_policy.adaptive_every=1", "on_policy.adaptive_step=0.25", f"on_policy.adaptive_threshold={threshold}",
    )  # fmt: skip
    assert all(e["val_loss"] > 0 for e in logs)
    expected = [0.0, 0.25, 0.5, 0.75] if rises else [0.0] * 4
    assert [e["lmbda"] for e in logs] == pytest.approx(expected)
    assert logs[0]["on_policy_fraction"] == 0.0  # lambda 0 at the first step: the data's completions


def test_replay_buffer_serves_the_student_batches_once_full(files, tmp_path, monkeypatch):
    """replay_ratio 1: the first on-policy batch is sampled and stored (buffer of 3 = one batch), every later one is
    replayed from the buffer, so the student samples exactly once."""
    import potstill.train.on_policy as on_policy

    real, calls = on_policy.rollout, []
    monkeypatch.setattr(on_policy, "rollout", lambda *a: calls.append(1) or real(*a))
    _, logs = _run(
        files, tmp_path / "run", "train.max_steps=3", "on_policy.lmbda=1.0", "on_policy.replay_size=3",
        "on_policy.replay_ratio=1.0", "on_policy.health_prompts=0",  # (the health check calls rollout too)
    )  # fmt: skip
    assert len(calls) == 1
    assert [e["replay_fraction"] for e in logs] == [0.0, 1.0, 1.0]
    assert (
        all(e["on_policy_fraction"] == 1.0 for e in logs) and "rollout_len" in logs[0] and "rollout_len" not in logs[1]
    )


@pytest.mark.parametrize(
    "opts",
    [
        ("on_policy.lmbda=0.5", "on_policy.replay_size=4", "on_policy.adaptive=true", "on_policy.adaptive_every=1",
         "on_policy.adaptive_threshold=100.0"),
        pytest.param(
            ("on_policy.lmbda=0.5", "on_policy.objective=rkl_sampled", "on_policy.baseline=running"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["replay+adaptive", "running-baseline"],
)  # fmt: skip
def test_resumed_run_equals_the_uninterrupted_one(files, tmp_path, monkeypatch, opts):
    """Killed after checkpoint 2 of 5, then resumed: the same logs (samples, lambda, replay, baseline) and weights."""
    opts = ("train.max_steps=5", "train.save_steps=2", *opts)
    full, full_log = _run(files, tmp_path / "full", *opts)
    interrupted_run(monkeypatch, _cfg(files, tmp_path / "resumed", *opts), step=2)  # after checkpoint-2
    resumed, resumed_log = _run(files, tmp_path / "resumed", *opts)
    assert resumed_log == full_log
    if "on_policy.replay_size=4" in opts:  # the buffer was used after the resume point, lambda moved
        assert any(e["replay_fraction"] > 0 for e in full_log[2:]) and full_log[-1]["lmbda"] > 0.5
    else:
        assert all("baseline" in e for e in full_log[2:] if e["on_policy_fraction"] > 0)
    a = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
