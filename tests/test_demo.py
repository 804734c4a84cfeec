"""`potstill demo`: settings, the arms' configs, resume bookkeeping, errors; (integration) --quick end to end."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from potstill import demo
from potstill.errors import Stopped, UserError


@pytest.mark.parametrize("quick", [True, False])
def test_demo_yaml_loads_and_arms_share_tokens_and_steps(quick: bool, tmp_path: Path):
    settings = demo.load_demo_settings(quick)
    kd = demo.arm_config(settings, "kd", tmp_path, Path("/teacher"))
    ce = demo.arm_config(settings, "ce", tmp_path, Path("/teacher"))
    assert kd.loss.alpha > 0 and kd.model.teacher == "/teacher"
    assert ce.loss.alpha == 0 and ce.model.teacher is None
    for section in ("data", "train"):
        a, b = getattr(kd, section).model_dump(), getattr(ce, section).model_dump()
        diff = {k for k in a if a[k] != b[k]}
        assert diff <= {"lr", "output_dir"}, diff  # same data, steps, batch: only the learning rate may differ
    assert kd.model.student == ce.model.student == str(tmp_path / "student_init")
    assert kd.train.output_dir != ce.train.output_dir


def test_quick_is_smaller_than_full():
    quick, full = demo.load_demo_settings(True), demo.load_demo_settings(False)
    assert quick.distill["train"]["max_steps"] < full.distill["train"]["max_steps"]
    assert quick.corpus.train_bytes <= full.corpus.train_bytes


def _fake_steps(monkeypatch, calls: list[str], fail_at: str | None = None) -> None:
    def make(name):
        def step(ctx):
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt
            (ctx["out"] / f"{name}.txt").write_text(name)
            return {"name": name}

        return step

    monkeypatch.setattr(demo, "STEPS", {name: make(name) for name in ("a", "b", "c")})
    monkeypatch.setattr(demo, "check_demo_extra", lambda: None)


def test_interrupted_demo_resumes_after_the_last_finished_step(tmp_path: Path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, calls, fail_at="b")
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "d", quick=True)
    state = json.loads((tmp_path / "d" / demo.STATE_FILE).read_text())
    assert list(state["done"]) == ["a"]
    _fake_steps(monkeypatch, calls)
    demo.run_demo(tmp_path / "d", quick=True)
    assert calls == ["a", "b", "b", "c"]
    state = json.loads((tmp_path / "d" / demo.STATE_FILE).read_text())
    assert list(state["done"]) == ["a", "b", "c"] and state["done"]["c"]["result"] == {"name": "c"}
    demo.run_demo(tmp_path / "d", quick=True, overwrite=True)  # starts over
    assert calls[4:] == ["a", "b", "c"]


def test_other_variant_or_foreign_dir_is_refused(tmp_path: Path, monkeypatch):
    _fake_steps(monkeypatch, [])
    demo.run_demo(tmp_path / "d", quick=True)
    with pytest.raises(UserError, match="quick demo"):
        demo.run_demo(tmp_path / "d", quick=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a potstill demo"):
            demo.run_demo(tmp_path / "foreign", quick=True, overwrite=overwrite)
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_demo_after_the_step_in_progress(tmp_path: Path, monkeypatch, signum):
    """Signalled during step b: b finishes and is recorded, the demo raises Stopped (128 + signum) naming b and the
    rerun, and the rerun runs c only."""
    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    steps = dict(demo.STEPS)

    def b_signalled(ctx):
        assert signal.getsignal(signum) is not signal.SIG_DFL, "no handler: the signal would kill pytest"
        os.kill(os.getpid(), signum)
        return steps["b"](ctx)

    monkeypatch.setitem(demo.STEPS, "b", b_signalled)
    before = signal.getsignal(signum)
    with pytest.raises(Stopped) as stopped:
        demo.run_demo(tmp_path / "d", quick=True)
    assert signal.getsignal(signum) is before and stopped.value.status == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after the demo's step b" in str(stopped.value)
    assert list(json.loads((tmp_path / "d" / demo.STATE_FILE).read_text())["done"]) == ["a", "b"]
    monkeypatch.setitem(demo.STEPS, "b", steps["b"])
    demo.run_demo(tmp_path / "d", quick=True)
    assert calls == ["a", "b", "c"]


def test_a_dir_holding_only_a_dead_runs_temporary_state_is_resumed(tmp_path: Path, monkeypatch):
    """A kill while the first state.json was written leaves `.state.json.tmp-PID-TID` alone: not a foreign dir."""
    _fake_steps(monkeypatch, [])
    out = tmp_path / "d"
    out.mkdir()
    (out / f".{demo.STATE_FILE}.tmp-99999999-1").write_text('{"mo')  # pid 99999999 is not running
    demo.run_demo(out, quick=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "c.txt", demo.STATE_FILE]


def test_settings_file_replaces_the_packaged_one(tmp_path: Path, monkeypatch):
    _fake_steps(monkeypatch, [])
    text = demo.demo_config_path().read_text().replace("train_bytes: 150000", "train_bytes: 1234")
    (tmp_path / "tiny.yaml").write_text(text)
    demo.run_demo(tmp_path / "d", quick=True, settings_file=tmp_path / "tiny.yaml")
    state = json.loads((tmp_path / "d" / demo.STATE_FILE).read_text())
    assert state["settings"]["corpus"]["train_bytes"] == 1234
    with pytest.raises(UserError, match="other settings"):  # the packaged settings do not resume it
        demo.run_demo(tmp_path / "d", quick=True)


def test_missing_demo_extra_is_one_line_naming_pip(monkeypatch):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda m: None if m == "matplotlib" else real(m))
    with pytest.raises(UserError, match=r'matplotlib: pip install "potstill\[cpu,demo\]"'):
        demo.check_demo_extra()


def test_cli_demo_help(run_cli):
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_cli_demo_refuses_foreign_dir_in_one_line(tmp_path: Path, run_cli, assert_one_line_error):
    (tmp_path / "x.txt").write_text("x")
    assert_one_line_error(run_cli("demo", "--quick", "--out", tmp_path), "not a potstill demo")


@pytest.mark.slow
@pytest.mark.integration
def test_quick_demo_end_to_end(tmp_path: Path, run_cli):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", out, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    for name in ("teacher", "student_kd", "student_ce"):
        assert {"params", "ppl", "bpb", "latency_ms_per_token"} <= set(models[name])
    assert {"top1_agreement", "kl_to_teacher"} <= set(models["student_kd"]) & set(models["student_ce"])
    assert report["ratios"]["param_ratio"] <= 0.2
    assert report["ratios"]["speedup"] >= 2.0  # 3x in a quiet machine; leave margin for a busy test runner
    assert models["student_kd"]["bpb"] < models["student_ce"]["bpb"]
    assert (out / "student_kd" / "student" / "config.json").is_file()
    assert all((out / p).is_file() for p in report["plots"]) and (out / "report.md").is_file()
    again = run_cli("demo", "--quick", "--out", out, timeout=600)  # finished: every step is skipped
    assert again.returncode == 0 and "skipped" in again.stderr


@pytest.mark.parametrize("fast", [True, False])
def test_demo_runs_in_float32_where_bf16_is_emulated(fast: bool, monkeypatch, tmp_path: Path):
    settings = demo.load_demo_settings(quick=True)
    assert settings.distill["train"]["mixed_precision"] == "bf16"  # demo.yaml's choice for a CPU with native bf16
    fitted = demo.fit_to_machine(settings, fast)
    if fast:
        assert fitted == settings
    else:
        assert fitted.distill["model"]["teacher_dtype"] == "float32"
        assert fitted.distill["train"]["mixed_precision"] == "no" and fitted.student.calib_dtype == "float32"
        assert settings.distill["train"]["mixed_precision"] == "bf16"  # the loaded settings are not changed
        for arm in ("kd", "ce"):  # each arm's config validates, in float32
            cfg = demo.arm_config(fitted, arm, Path("out"), Path("teacher"))
            assert cfg.train.mixed_precision == "no"


def test_a_resumed_demo_keeps_the_precision_it_started_in(tmp_path: Path, monkeypatch):
    """The bf16 decision is made once and kept in state.json: a resume on a machine whose probe answers otherwise
    (a timing probe under load did) runs in the first run's precision."""
    from potstill.models import load

    seen = []
    _fake_steps(monkeypatch, [], fail_at="b")
    real_b = demo.STEPS["b"]
    monkeypatch.setitem(demo.STEPS, "b", lambda ctx: (seen.append(ctx["settings"].student.calib_dtype), real_b(ctx)))
    monkeypatch.setattr(load, "bf16_is_fast", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "d", quick=True)
    monkeypatch.setattr(load, "bf16_is_fast", lambda: False)
    _fake_steps(monkeypatch, [])
    monkeypatch.setitem(demo.STEPS, "b", lambda ctx: (seen.append(ctx["settings"].student.calib_dtype), {}))
    demo.run_demo(tmp_path / "d", quick=True)
    assert seen == ["bfloat16", "bfloat16"]
    assert json.loads((tmp_path / "d" / demo.STATE_FILE).read_text())["bf16_is_fast"] is True


def test_bf16_probe_answers_a_bool():
    from potstill.models.load import bf16_is_fast

    assert isinstance(bf16_is_fast(), bool)


def test_eval_step_scores_both_students_with_one_teacher_pass(tmp_path: Path, make_model_dir, tiny_corpus):
    """The eval step's students get what `evaluate` gives each alone; the teacher body runs twice per batch in all
    (its own scoring, then once for both students), not three times."""
    import torch

    from potstill.data import load_dataset
    from potstill.eval.metrics import evaluate
    from potstill.models.load import load_model
    from potstill.teacher.online import OnlineTeacher

    out = tmp_path / "d"
    (out / "corpus").mkdir(parents=True)
    rows = [{"text": t, "domain": d} for t, d in zip(tiny_corpus, ["code", "docs"] * len(tiny_corpus), strict=False)]
    (out / "corpus" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = make_model_dir("teacher", seed=1)
    done = {"teacher": {"result": str(teacher)}}
    done.update(
        {f"train_{arm}": {"result": {"student": str(make_model_dir(arm, seed=s))}} for arm, s in (("kd", 2), ("ce", 3))}
    )
    settings = demo.load_demo_settings(quick=True)
    settings.distill["model"]["teacher_dtype"] = "float32"
    calls = []
    body = torch.nn.Module.__call__

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return body(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "__call__", counting)
        results = demo._step_eval({"out": out, "settings": settings, "state": {"done": done}})
    seq_len, heldout = settings.distill["data"]["seq_len"], [out / "corpus" / "heldout.jsonl"]
    t_model, t_tok = load_model(teacher)
    n_batches = -(-len(load_dataset(heldout, t_tok, seq_len)) // 8)
    assert calls.count("LlamaModel") == 4 * n_batches  # the teacher twice + the two students
    for arm in ("kd", "ce"):
        model, tok = load_model(done[f"train_{arm}"]["result"]["student"])
        alone = evaluate(model, load_dataset(heldout, tok, seq_len), OnlineTeacher(t_model), progress=False)
        assert results[f"student_{arm}"] == alone
