"""The CLI surface: every command answers --help, --version works, bad options are one-line errors."""

import pytest

from potstill import __version__

COMMANDS = [
    [],
    ["distill"],
    ["eval"],
    ["losses"],
    ["check"],
    ["teacher"],
    ["teacher", "prepare"],
    ["student"],
    ["student", "init"],
    ["demo"],
    ["cache"],
    ["cache", "build"],
    ["cache", "verify"],
    ["cache", "info"],
    ["generate"],
    ["serve"],
    ["report"],
    ["plan"],
    ["export"],
    ["bench"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_answers_help(cmd, run_cli):
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_version(run_cli):
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"potstill {__version__}"


def test_print_config_applies_overrides(run_cli):
    proc = run_cli("distill", "--print-config", "model.student=s", "loss.name=rkl", "loss.alpha=0.9")
    assert proc.returncode == 0, proc.stderr
    assert "name: rkl" in proc.stdout and "alpha: 0.9" in proc.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.name=nope", "loss.name"),
        ("loss.beta=1.5", "loss.beta"),
        ("loss.alpha=2", "loss.alpha"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.bogus=1", "unknown key"),
    ],
)
def test_bad_config_is_one_line(override, needle, run_cli, assert_one_line_error):
    assert_one_line_error(run_cli("distill", "--print-config", "model.student=s", override), needle)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_user_error_is_printed_by_rank_0_only(rank, monkeypatch, run_main):
    # under torchrun every rank raises the same UserError: one line in all, the others exit 2 silently
    monkeypatch.setenv("RANK", rank)
    proc = run_main("distill", "--print-config", "model.student=s", "loss.name=nope")
    assert proc.returncode == 2
    assert ("loss.name" in proc.stderr) == (rank == "0") and "Traceback" not in proc.stderr
    assert rank == "0" or proc.stderr == ""


# ----- every command that does work: -c FILE, key=value, its options, one-line errors -------------------------------

STAGES = {  # command -> (config class name, a complete config)
    ("distill",): ("DistillConfig", {"model": {"student": "s", "teacher": "t"}, "data": {"train": ["a.jsonl"]}}),
    ("cache", "build"): ("CacheConfig", {"teacher": "t", "data": ["a.jsonl"], "out": "c"}),
    ("student", "init"): ("StudentInitConfig", {"teacher": "t", "layers": 2, "out": "s"}),
    ("eval",): ("EvalConfig", {"model": "m", "data": ["a.jsonl"], "out": "e"}),
    ("generate",): ("GenerateConfig", {"inputs": ["q.jsonl"], "teacher": {"model": "t"}}),
}


@pytest.mark.parametrize("cmd", list(STAGES), ids=" ".join)
def test_stage_help_lists_config_and_every_option_of_its_config(cmd, run_cli):
    import potstill.config as config
    from potstill.config.base import field_flag
    from potstill.config.reference import iter_fields

    text = run_cli(*cmd, "--help").stdout
    assert "--config" in text and "--print-config" in text
    options = [field_flag(info) for _, info, _ in iter_fields(getattr(config, STAGES[cmd][0]))]
    for option in filter(None, options):
        assert option in text, f"{option} (a field of {STAGES[cmd][0]}) is not an option of `{' '.join(cmd)}`"


@pytest.mark.parametrize("cmd", list(STAGES), ids=" ".join)
def test_stage_reads_a_config_file_and_overrides(cmd, tmp_path, run_cli):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(STAGES[cmd][1]))
    key = "train.seed" if cmd == ("distill",) else "sampling.seed" if cmd == ("generate",) else "overwrite"
    value = "7" if "seed" in key else "true"
    proc = run_cli(*cmd, "-c", path, f"{key}={value}", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    for part in key.split("."):
        printed = printed[part]
    assert str(printed).lower() == value


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["cache", "build", "--teacher", "t", "--data", "a", "--out", "c", "--targets", "dense"],
         ["--targets must be one of topk, sampled", "'dense'"]),
        (["cache", "build", "--teacher", "t", "--data", "a", "--out", "c", "encoding=zip"],
         ["config: encoding: must be one of compact, lossless", "'zip'"]),
        (["cache", "build", "--teacher", "t", "--data", "a", "--out", "c", "--dtype", "int8"],
         ["--dtype must be one of float32, bfloat16, float16"]),
        (["student", "init", "--teacher", "t", "--layers", "2", "--out", "s", "--select", "random"],
         ["--select must be one of measured, even", "'random'"]),
        (["student", "init", "--teacher", "t", "--layers", "2", "--out", "s", "--calib-dtype", "int8"],
         ["--calib-dtype must be one of float32, bfloat16, float16"]),
        (["eval", "--model", "m", "--data", "a", "--out", "e", "--seq-len", "4"], ["--seq-len must be >= 8 (got 4)"]),
        (["eval", "--data", "a", "--out", "e"], ["config: model: required but missing (option --model)"]),
        (["distill", "model.student=s", "train.scheduler=step"], ["config: train.scheduler: must be one of cosine"]),
    ],
    ids=["cache-targets", "cache-encoding", "cache-dtype", "student-select", "student-dtype", "eval-seq-len",
         "eval-missing", "distill-scheduler"],
)  # fmt: skip
def test_bad_choices_and_values_are_one_line_errors(args, needles, run_cli, assert_one_line_error):
    assert_one_line_error(run_cli(*args, "--print-config"), *needles)


def test_distill_refuses_a_config_that_cannot_run_before_loading_anything(tmp_path, run_cli, assert_one_line_error):
    assert_one_line_error(
        run_cli("distill", "model.student=s", "data.train=a.jsonl"), "config: model.teacher: required"
    )
    assert not (tmp_path / "runs").exists()


def test_cache_build_from_a_training_config_prints_the_runs_settings(tmp_path, run_cli, assert_one_line_error):
    import yaml

    run = {
        "model": {"student": "s", "teacher": "t", "dtype": "bfloat16"},
        "loss": {"temperature": 2.0},
        "teacher": {"source": "cache", "cache": "c"},
        "data": {"train": ["a.jsonl"], "seq_len": 64, "add_bos": False},
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(run))
    proc = run_cli("cache", "build", "-c", path, "--k", "16", "data.seq_len=128", "--print-config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    expected = {"teacher": "t", "student": "s", "data": ["a.jsonl"], "out": "c", "seq_len": 128, "add_bos": False}
    assert {key: cfg[key] for key in expected} == expected
    assert (cfg["temperature"], cfg["dtype"], cfg["k"]) == (2.0, "bfloat16", 16)
    bad = run_cli("cache", "build", "-c", path, "--seq-len", "32", "--print-config")
    assert_one_line_error(bad, "--seq-len 32", "data.seq_len=64")
