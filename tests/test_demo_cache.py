"""`potstill demo --teacher-cache`: the KD arm's config, the variant check, the report line, and (tiny models) the
`cache` + `train_kd` steps resuming after interruptions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from potstill import demo
from potstill.errors import UserError
from potstill.eval.report import render_markdown, summarize
from report_inputs import demo_results


def _cached(settings: demo.DemoSettings) -> demo.DemoSettings:
    return settings.model_copy(update={"teacher_source": "cache"})


@pytest.mark.parametrize("quick", [True, False])
def test_cache_source_points_the_kd_arm_at_the_cache_and_leaves_ce_alone(quick: bool, tmp_path: Path):
    online = demo.load_demo_settings(quick)
    assert online.teacher_source == "online"  # demo.yaml's default
    cached = _cached(online)
    configs = {
        (source, arm): demo.arm_config(settings, arm, tmp_path, Path("/teacher")).model_dump()
        for source, settings in (("online", online), ("cache", cached))
        for arm in ("kd", "ce")
    }
    kd = configs["cache", "kd"]
    assert kd["teacher"] == {"source": "cache", "cache": str(tmp_path / demo.CACHE_DIR), "endpoint": None}
    assert kd["model"]["teacher"] == "/teacher"  # kept: the trainer checks the cache was built from this teacher
    assert configs["online", "kd"]["teacher"]["source"] == "online"
    assert {k: v for k, v in kd.items() if k != "teacher"} == {
        k: v for k, v in configs["online", "kd"].items() if k != "teacher"
    }
    assert configs["cache", "ce"] == configs["online", "ce"]


def test_cache_step_runs_only_with_the_cache_source_before_train_kd():
    online = demo.load_demo_settings(True)
    assert "cache" not in demo.variant_steps(online)
    names = list(demo.variant_steps(_cached(online)))
    assert names.index("student") < names.index("cache") == names.index("train_kd") - 1


def _fake_steps(monkeypatch, calls: list[str]) -> None:
    def make(name):
        return lambda ctx: calls.append(name) or {"name": name}

    monkeypatch.setattr(demo, "STEPS", {name: make(name) for name in ("a", "cache", "b")})
    monkeypatch.setattr(demo, "check_demo_extra", lambda: None)


def test_a_dir_made_with_one_source_refuses_the_other(tmp_path: Path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    demo.run_demo(tmp_path / "online", quick=True)
    demo.run_demo(tmp_path / "cached", quick=True, teacher_cache=True)
    assert calls == ["a", "b", "a", "cache", "b"]
    with pytest.raises(UserError, match="quick demo with the online teacher, not a quick demo with the teacher cache"):
        demo.run_demo(tmp_path / "online", quick=True, teacher_cache=True)
    with pytest.raises(UserError, match=r"resume it with `potstill demo --quick --teacher-cache --out"):
        demo.run_demo(tmp_path / "cached", quick=True)
    state = json.loads((tmp_path / "online" / demo.STATE_FILE).read_text())
    assert state["settings"]["teacher_source"] == "online" and list(state["done"]) == ["a", "b"]  # untouched
    demo.run_demo(tmp_path / "online", quick=True, teacher_cache=True, overwrite=True)  # starts over, with a cache
    assert calls[5:] == ["a", "cache", "b"]


def test_cli_teacher_cache_on_an_online_dir_is_one_line(tmp_path: Path, monkeypatch, run_main, assert_one_line_error):
    _fake_steps(monkeypatch, [])
    demo.run_demo(tmp_path / "d", quick=True)
    proc = run_main("demo", "--quick", "--teacher-cache", "--out", tmp_path / "d")
    assert proc.returncode == 2
    assert_one_line_error(proc, "online teacher, not a quick demo with the teacher cache")


def test_state_written_before_teacher_source_existed_still_resumes(tmp_path: Path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    settings = demo.load_demo_settings(True).model_dump(mode="json")
    del settings["teacher_source"], settings["cache"]  # what an online demo dir of the previous version holds
    out = tmp_path / "old"
    out.mkdir()
    (out / demo.STATE_FILE).write_text(json.dumps({"mode": "quick", "settings": settings, "done": {"a": {}}}))
    demo.run_demo(out, quick=True)
    assert calls == ["b"]


def test_report_says_which_teacher_source_the_kd_arm_used():
    cache = {"k": 64, "encoding": "compact", "tokens": 12345, "bytes_per_token": 151.25, "teacher_dtype": "float32"}
    lines = {}
    for source in ("online", "cache"):
        results = {
            **demo_results(),
            "teacher_source": {"kd_arm": source, **({"cache": cache} if source == "cache" else {})},
        }
        summary = summarize(results)
        assert summary["teacher_source"] == results["teacher_source"]
        lines[source] = [line for line in render_markdown(summary).splitlines() if line.startswith("Teacher source")]
    assert len(lines["online"]) == 1 and "**online**" in lines["online"][0]
    assert (
        len(lines["cache"]) == 1
        and "top-64, compact, 151.2 bytes per token over 12,345 tokens, the teacher in float32" in lines["cache"][0]
    )
    assert not [line for line in render_markdown(summarize(demo_results())).splitlines() if "Teacher source" in line]


# ---- the real `cache` and `train_kd` steps on tiny models (models_dir: student hidden 32, teacher 64) ----


def _tiny_settings() -> demo.DemoSettings:
    return demo.DemoSettings.model_validate(
        {
            "teacher_source": "cache",
            "cache": {"k": 8, "encoding": "compact", "batch_size": 4},
            "student": {"layers": 1},
            "distill": {
                "loss": {"name": "fkl", "temperature": 2.0},
                "data": {"seq_len": 16, "add_bos": True},
                "train": {"max_steps": 4, "batch_size": 2, "warmup_steps": 0, "save_steps": 2, "logging_steps": 1},
            },
            "kd": {"loss.alpha": 0.5, "train.lr": 0.003},
            "ce": {"train.lr": 0.003},
        }
    )


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _tiny_pipeline(monkeypatch, models: Path) -> None:
    """demo.STEPS = fake teacher/corpus/student steps on models_dir's tiny models + the real cache, train_kd."""

    def corpus(ctx):
        (ctx["out"] / "corpus").mkdir()
        shutil.copy(models / "train.jsonl", ctx["out"] / "corpus" / "train.jsonl")

    steps = {
        "teacher": lambda ctx: str(models / "teacher"),
        "corpus": corpus,
        "student": lambda ctx: str(shutil.copytree(models / "student", ctx["out"] / "student_init")),
        "cache": demo.STEPS["cache"],
        "train_kd": demo.STEPS["train_kd"],
    }
    monkeypatch.setattr(demo, "STEPS", steps)
    monkeypatch.setattr(demo, "load_demo_settings", lambda quick, path=None: _tiny_settings())
    monkeypatch.setattr(demo, "check_demo_extra", lambda: None)


def test_cache_and_train_kd_steps_resume_on_tiny_models(models_dir, tmp_path: Path, monkeypatch):
    import potstill.teacher.cache.writer as cache_mod
    import potstill.train.setup as load_mod  # where the training run loads its models
    from potstill.train.trainer import DistillTrainer

    _tiny_pipeline(monkeypatch, models_dir)
    out = tmp_path / "demo"
    # 1. interrupted in `cache` after its shard, before the manifest
    real_finalize = cache_mod.finalize
    monkeypatch.setattr(cache_mod, "finalize", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True)
    assert list(json.loads((out / demo.STATE_FILE).read_text())["done"]) == ["teacher", "corpus", "student"]

    # 2. `cache` resumes (shard reused, manifest written); interrupted in `train_kd` at step 4, after checkpoint-2
    monkeypatch.setattr(cache_mod, "finalize", real_finalize)
    real_records, scored = cache_mod._Scorer.records, []
    monkeypatch.setattr(cache_mod._Scorer, "records", lambda *a: scored.append(1) or real_records(*a))
    real_loss, steps, interrupt = DistillTrainer.compute_loss, [], {"at_step": 3}

    def compute_loss(trainer, *args, **kwargs):
        steps.append(trainer.state.global_step)  # steps finished before this loss
        if trainer.state.global_step == interrupt["at_step"]:
            raise KeyboardInterrupt
        return real_loss(trainer, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "compute_loss", compute_loss)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True)
    assert not scored  # the teacher scored nothing again
    state = json.loads((out / demo.STATE_FILE).read_text())
    assert list(state["done"]) == ["teacher", "corpus", "student", "cache"]
    built = state["done"]["cache"]["result"]
    manifest = json.loads((out / demo.CACHE_DIR / "manifest.json").read_text())
    assert built["k"] == 8 and built["tokens"] == manifest["tokens"] > 0
    assert built["bytes_per_token"] == pytest.approx(manifest["bytes"] / manifest["tokens"], abs=0.01)
    assert (out / "student_kd" / "checkpoint-2").is_dir() and not (out / "student_kd" / "summary.json").exists()

    # 3. `train_kd` resumes from checkpoint-2, from the cache, with no teacher model loaded
    steps.clear()
    interrupt["at_step"] = None
    loaded = []
    real_load = load_mod.load_model
    monkeypatch.setattr(
        load_mod, "load_model", lambda path, *a, **kw: loaded.append(Path(path)) or real_load(path, *a, **kw)
    )
    demo.run_demo(out, quick=True)
    assert steps and min(steps) >= 2  # steps 1-2 were not trained again
    assert loaded == [out / "student_init"]
    run = yaml.safe_load((out / "student_kd" / "config.yaml").read_text())
    assert run["teacher"] == {"source": "cache", "cache": str(out / demo.CACHE_DIR), "endpoint": None}
    assert json.loads((out / "student_kd" / "summary.json").read_text())["global_step"] == 4
    assert list(json.loads((out / demo.STATE_FILE).read_text())["done"])[-1] == "train_kd"
