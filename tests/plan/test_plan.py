"""`potstill plan`: shapes from config.json, the memory model against a measured run, the step-time probe,
recommendations, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from potstill.config import load_config
from potstill.errors import UserError
from potstill.plan import (
    CACHE_BYTES,
    GIB,
    StepProbe,
    cache_bytes_per_token,
    format_plan,
    measure_run,
    plan_config,
    probe_step,
    random_models,
    read_shape,
    step_seconds,
)

WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer, build_model) -> Path:
    """Student (hidden 32), teacher (hidden 64) and a second teacher (hidden 48) over the tiny tokenizer, and a
    training file."""
    root = tmp_path_factory.mktemp("plan")
    build_model(tiny_tokenizer, 0, max_positions=256, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=256, save_to=root / "teacher")
    build_model(tiny_tokenizer, 2, hidden=48, max_positions=256, save_to=root / "teacher2")
    rng = random.Random(0)
    rows = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) for _ in range(200)]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root


def config_overrides(root: Path, *overrides: str, student: str = "student", teacher: str = "teacher") -> list[str]:
    return [
        f"model.student={root / student}", f"model.teacher={root / teacher}", f"data.train=[{root / 'train.jsonl'}]",
        f"train.output_dir={root / 'run'}", "train.overwrite=true", *overrides,
    ]  # fmt: skip


def config(root: Path, *overrides: str, student: str = "student", teacher: str = "teacher"):
    return load_config(None, config_overrides(root, *overrides, student=student, teacher=teacher))


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_model(tmp_path, tiny_tokenizer, tied, build_model):
    path = tmp_path / "m"
    build_model(
        tiny_tokenizer, 0, vocab_size=1000, hidden=48, max_positions=256, tie_word_embeddings=tied, save_to=path
    )
    real = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    # the plan counts 4 norms per layer (Gemma's layout); Llama has 2: a few hundred of ~100k params
    assert abs(read_shape(path, "student").params - real) / real < 0.005


def test_bigger_batch_and_dense_loss_cost_more(root):
    small = plan_config(config(root, "train.batch_size=2"), probe=False)
    big = plan_config(config(root, "train.batch_size=8"), probe=False)
    dense = plan_config(config(root, "train.batch_size=8", "loss.fused=false"), probe=False)
    assert big.memory["activations"] > small.memory["activations"]
    assert dense.memory["loss"] > big.memory["loss"] - 64 * 300 * 4  # minus the fused head-gradient buffer
    assert big.online_total - big.cache_total == big.memory["teacher_online"] > 0


def test_bf16_teacher_halves_the_teacher_weights_not_the_student(root):
    full = plan_config(config(root), probe=False).memory
    low = plan_config(config(root, "model.teacher_dtype=bfloat16"), probe=False).memory
    # weights, head copy and activations halve; the float32 attention scores do not
    assert full["teacher_online"] / 2 < low["teacher_online"] < full["teacher_online"]
    assert low["student_weights"] == full["student_weights"]


def test_alpha_zero_needs_no_teacher(root):
    plan = plan_config(config(root, "loss.alpha=0", teacher="missing"), probe=False)
    assert plan.online_total is None and "teacher_online" not in plan.memory
    assert plan.recommend["teacher"].startswith("none")


def test_recommends_cache_when_teacher_does_not_fit(root):
    fits = plan_config(config(root), memory_bytes=64 * GIB, probe=False)
    assert fits.recommend["teacher"].startswith("online")
    # a budget between the cached and the online totals (over the 0.9 headroom)
    between = (fits.cache_total + fits.online_total) / 2 / 0.9
    assert plan_config(config(root), memory_bytes=int(between), probe=False).recommend["teacher"].startswith("cache")
    shared = plan_config(config(root), memory_bytes=64 * GIB, students=3, probe=False)
    assert "3 students" in shared.recommend["teacher"]


def test_chunk_shrinks_when_memory_is_short(tmp_path, tiny_tokenizer, build_model):
    build_model(tiny_tokenizer, 0, vocab_size=65536, max_positions=256, save_to=tmp_path / "student")
    build_model(tiny_tokenizer, 1, vocab_size=65536, max_positions=256, save_to=tmp_path / "teacher")
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    cfg = config(tmp_path, "train.batch_size=8", "data.seq_len=256")
    roomy = plan_config(cfg, memory_bytes=64 * GIB, probe=False)
    assert roomy.recommend["chunk_size"] == 256  # 2^24 / 65536
    tight = plan_config(cfg, memory_bytes=int((roomy.online_total - 200 * 2**20) / 0.9), probe=False)
    assert 16 <= tight.recommend["chunk_size"] < 256


def several(root: Path, *teachers: str, probe: bool = False):
    """The plan of a run distilling from `model.teachers` = these directories under root."""
    entries = ", ".join(f"{{path: {root / t}}}" for t in teachers)
    overrides = config_overrides(root, f"model.teachers=[{entries}]", "train.batch_size=2", "data.seq_len=64")
    return plan_config(load_config(None, [o for o in overrides if not o.startswith("model.teacher=")]), probe=probe)


def test_plan_counts_every_teacher_of_model_teachers(root):
    one = plan_config(config(root, "train.batch_size=2", "data.seq_len=64"), probe=False)
    two = several(root, "teacher", "teacher2")
    shapes = [read_shape(root / t, "teacher") for t in ("teacher", "teacher2")]
    assert two.teachers == 2 and two.teacher_params == sum(t.params for t in shapes) > one.teacher_params
    # each teacher's weights; one layer's activations of the wider (hidden 64: the first) as they run in turn
    mem = two.memory
    assert mem["teacher_online/t0"] + mem["teacher_activations"] == one.memory["teacher_online"]
    assert mem["teacher_online/t1"] > 0 and two.online_total - two.cache_total == sum(
        mem[k] for k in ("teacher_online/t0", "teacher_online/t1", "teacher_activations")
    )
    assert two.cache_total == one.cache_total and two.online_total > one.online_total
    with pytest.raises(UserError, match=r"missing.*model.teachers\[1\].path"):
        several(root, "teacher", "missing")


def test_plan_times_every_teacher_of_model_teachers(root):
    plan = several(root, "teacher", "teacher2", probe=True)
    assert len(plan.probe["teacher"]) == 2
    shapes = [read_shape(root / t, "teacher") for t in ("teacher", "teacher2")]
    probe = StepProbe(**{**plan.probe, "teacher": tuple(map(tuple, plan.probe["teacher"]))})
    cfg = config(root, "train.batch_size=2", "data.seq_len=64")
    first_only = step_seconds(
        replace(probe, teacher=probe.teacher[:1]), read_shape(root / "student", "s"), shapes[:1], cfg
    )
    assert plan.step_seconds["online"] > first_only["online"] > plan.step_seconds["cache"] > 0
    text = format_plan(plan)
    assert "2 teachers" in text and "teacher t0" in text and "teacher t1" in text


def test_cache_bytes_interpolate_the_measured_table():
    for enc, table in CACHE_BYTES.items():
        for k, measured in table.items():
            assert cache_bytes_per_token(k, enc) == pytest.approx(measured)
    values = [cache_bytes_per_token(k) for k in (1, 8, 20, 64, 100, 128, 256)]
    assert values == sorted(values)


def test_table_and_probe(root):
    cfg = config(root, "train.grad_accum=2", "train.batch_size=2", "data.seq_len=64", "train.max_steps=25")
    plan = plan_config(cfg)
    step = plan.step_seconds
    assert plan.probe["seconds"] > 0 and step["online"] > step["cache"] > 0 and step["logging_extra"] > 0
    # 25 steps, 3 of them logging (10, 20 and the last)
    assert plan.run_seconds["online"] == pytest.approx(25 * step["online"] + 3 * step["logging_extra"])
    assert plan.tokens_per_step == 2 * 2 * 64
    text = format_plan(plan)
    assert "total, online teacher" in text and "chunk_size" in text and "s/layer" in text


def test_plan_without_probe_imports_no_torch(root):
    code = (
        "import sys; from potstill.plan import plan_config; from potstill.config import load_config\n"
        f"plan = plan_config(load_config(None, {config_overrides(root)!r}), probe=False)\n"
        "assert 'torch' not in sys.modules and plan.probe is None and plan.step_seconds == {}, plan"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_tokenizer, build_model) -> Path:
    """A student wide enough (hidden 128) that one decoder layer costs clearly more than timer noise."""
    root = tmp_path_factory.mktemp("wide")
    build_model(tiny_tokenizer, 0, hidden=128, max_positions=256, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=256, save_to=root / "teacher")
    (root / "train.jsonl").write_text('{"text": "hi"}\n')
    return root


def test_probe_splits_fixed_and_per_layer_costs(wide, tiny_tokenizer):
    cfg = config(wide, "train.batch_size=4", "data.seq_len=64")
    probe = probe_step(cfg, len(tiny_tokenizer), teachers=[str(wide / "teacher")], seconds=0.3)
    parts = (*probe.teacher, probe.forward, probe.loss, probe.backward, probe.optimizer)
    assert all(fixed >= 0 and per_layer >= 0 for fixed, per_layer in parts)
    assert sum(fixed for fixed, _ in parts) > 0  # embedding, head and loss, AdamW on them
    assert probe.forward[1] + probe.backward[1] > 0  # a decoder layer costs time
    assert probe.compute_dtype == "float32"
    shape = read_shape(wide / "student", "student")
    teacher = read_shape(wide / "teacher", "teacher")
    base = step_seconds(probe, shape, [teacher], cfg)
    deeper = step_seconds(probe, replace(shape, layers=12), [teacher], cfg)
    assert deeper["cache"] > base["cache"] > 0 and deeper["online"] > base["online"] > base["cache"]
    accum = step_seconds(probe, shape, [teacher], config(wide, "train.grad_accum=3"))
    assert accum["online"] > base["online"]  # three micro-steps, one optimizer step


def test_probe_runs_in_the_runs_dtypes(wide, tiny_tokenizer):
    cfg = config(wide, "train.batch_size=2", "data.seq_len=32", "train.mixed_precision=bf16")
    assert probe_step(cfg, len(tiny_tokenizer), teachers=[], seconds=0.0).compute_dtype == "bfloat16"
    # a bf16 teacher is built in bf16 at 1 and 2 layers, with the student's vocabulary rows shared by both depths
    teachers = random_models(str(wide / "teacher"), "bfloat16", vocab=100)
    for layers, model in teachers.items():
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.config.num_hidden_layers == layers and model.get_output_embeddings().weight.shape[0] == 100
    assert teachers[1].get_input_embeddings() is teachers[2].get_input_embeddings()


def test_plan_is_within_25_percent_of_measured_peak(root, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as this process (tests/conftest.py): 2 threads crawl on busy cores
    cfg = config(root, "train.max_steps=2", "train.batch_size=4", "data.seq_len=64")
    plan = plan_config(cfg, probe=False)
    peak = measure_run(cfg).peak
    assert 0.75 < plan.online_total / peak < 1.25, (plan.memory, peak)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_plan_tracks_a_loss_dominated_run(tmp_path, tiny_tokenizer, fused, build_model):
    """V = 32,768: the [tokens, V] loss buffers (dense: 512 MiB) are half the peak, not the runtime."""
    build_model(tiny_tokenizer, 0, vocab_size=32768, hidden=64, max_positions=256, save_to=tmp_path / "student")
    build_model(tiny_tokenizer, 1, vocab_size=32768, hidden=128, max_positions=256, save_to=tmp_path / "teacher")
    rows = [json.dumps({"text": " ".join(WORDS * 3)})] * 100
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = config(tmp_path, "train.max_steps=2", "train.batch_size=4", "data.seq_len=128", f"loss.fused={fused}")
    plan = plan_config(cfg, probe=False)
    peak = measure_run(cfg).peak
    assert 0.75 < plan.online_total / peak < 1.25, (plan.memory, peak)


@pytest.mark.slow
def test_planned_step_time_tracks_a_measured_run(tmp_path, tiny_tokenizer, monkeypatch, build_model):
    """V = 32,768, fused KD: the probe's s/step against the median plain step of a real 10-step run.

    The bound is looser than the ~30% seen in benchmarks/README.md: other jobs' load moves between probe and run.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the run's threads = this test process's (tests/conftest.py)
    build_model(tiny_tokenizer, 0, vocab_size=32768, hidden=64, max_positions=256, save_to=tmp_path / "student")
    build_model(tiny_tokenizer, 1, vocab_size=32768, hidden=128, max_positions=256, save_to=tmp_path / "teacher")
    (tmp_path / "train.jsonl").write_text("\n".join([json.dumps({"text": " ".join(WORDS * 3)})] * 100) + "\n")
    cfg = config(tmp_path, "train.max_steps=10", "train.batch_size=4", "data.seq_len=128")
    planned = plan_config(cfg).step_seconds["online"]
    measured, _ = measure_run(cfg).step_seconds(cfg)
    assert 0.6 < planned / measured < 1.6, (planned, measured)


def test_missing_model_dir_is_a_user_error(root, tmp_path):
    with pytest.raises(UserError, match="missing.*model.teacher"):
        plan_config(config(root, teacher="missing"), probe=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty/config.json: model.student"):
        plan_config(config(root, student=str(tmp_path / "empty")), probe=False)


def test_cli_json_and_one_line_errors(root, tmp_path, run_cli, assert_one_line_error):
    args = ["plan", f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
            f"data.train=[{root / 'train.jsonl'}]", "--memory-gb", "4"]  # fmt: skip
    proc = run_cli(*args, "--json", "--no-probe")  # the probe itself: test_table_and_probe
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["budget"] == 4 * GIB and plan["recommend"]["k"] == 64 and plan["probe"] is None
    bad = run_cli(*args[:1], f"model.student={tmp_path / 'nope'}", *args[2:])
    assert_one_line_error(bad, "nope", "model.student")
    missing = run_cli(*args[:3], f"data.train=[{tmp_path / 'none.jsonl'}]")
    assert_one_line_error(missing, "none.jsonl")
