"""Config loading: YAML + key=value overrides, one-line errors naming the key."""

import re
from pathlib import Path

import pytest

from potstill.config import DistillConfig, dump_config, load_config, validate_config
from potstill.config.base import Section, Seeds, validate
from potstill.errors import UserError

CONFIG_DIR = Path(__file__).parents[2] / "src" / "potstill" / "configs"


def test_overrides_apply_and_parse_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {student: s}\nloss: {name: jsd, beta: 0.2}\n")
    cfg = load_config(cfg_file, ["loss.beta=0.7", "train.max_steps=5", "loss.alpha=auto", "data.train=a.jsonl"])
    assert cfg.loss.name == "jsd" and cfg.loss.beta == 0.7
    assert cfg.train.max_steps == 5 and cfg.loss.alpha == "auto"
    assert cfg.data.train == ["a.jsonl"]


def test_dump_round_trips():
    cfg = load_config(None, ["model.student=s", "loss.temperature=2"])
    assert validate_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.name=kl2", "loss.name"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("loss.alpha=-0.1", "loss.alpha"),
        ("loss.beta=2", "loss.beta"),
        ("loss.skew=-1", "loss.skew"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-1", "loss.temperature"),
        ("train.max_steps=0", "train.max_steps"),
        ("loss.tempreature=1", "unknown key 'loss.tempreature'"),
        ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError) as err:
        load_config(None, ["model.student=s", override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.alpha=true", "config: loss.alpha: must be a number, not true/false"),
        ("data.mixing.weights={code: 1, web: true}", "config: data.mixing.weights: must be a number, not true/false"),
        ("hidden.layers={1: 2, 3: false}", "config: hidden.layers: must be an integer, not true/false"),
    ],
)
def test_a_boolean_is_not_a_number_inside_lists_and_mappings_either(override, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        load_config(None, ["model.student=s", override])
    assert load_config(None, ["model.student=s", "data.mixing.weights={code: 1, web: 0.5}"]).data.mixing.weights


def test_errors_name_the_file_a_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  student: s\nloss:\n  tempreature: 2\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: unknown key 'loss.tempreature'$"):
        load_config(path)
    path.write_text("model:\n  student: s\nloss:\n  alpha: 3\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: loss.alpha: must be in"):
        load_config(path)
    # a key=value override set the bad value: the file is not to blame
    with pytest.raises(UserError, match=r"^config: loss.alpha: must be in .*\(got 2.0\)$"):
        load_config(path, ["loss.alpha=2"])
    with pytest.raises(UserError, match=r"^config: loss.temperature: must be > 0"):
        load_config(path, ["loss.alpha=0.5", "loss.temperature=0"])


def test_seeds_refuse_a_boolean_item():
    class Recipe(Section):
        seeds: Seeds = (0, 1)

    assert Recipe.model_validate({"seeds": "0, 2"}).seeds == (0, 2)
    with pytest.raises(UserError, match=re.escape("config: seeds: must be an integer, not true/false")):
        validate({"seeds": [0, True]}, Recipe)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="override 'loss.alpha': expected key=value"):
        load_config(None, ["loss.alpha"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "model" in raw:  # a distill config
        assert isinstance(load_config(path), DistillConfig)
    else:  # another command's settings (e.g. the demo): at least valid YAML mapping
        assert isinstance(raw, dict)


# ----- the generated reference ------------------------------------------------------------------------------------


def test_generated_reference_is_current():
    from potstill.config.reference import REGENERATE, generated_files

    files = generated_files()
    assert {p.name for p in files} == {"kd_default.yaml", "config-reference.md"}  # run from a checkout
    for path, text in files.items():
        assert path.is_file() and path.read_text() == text, (
            f"{path} is stale (field descriptions changed): regenerate it with `{REGENERATE}`"
        )


def test_every_field_of_every_command_is_described():
    from potstill.config.reference import COMMANDS, iter_fields

    for _, model in COMMANDS:
        for key, info, _section in iter_fields(model):
            assert info.description, f"{model.__name__}.{key} has no description"


def test_reference_lists_fields_types_defaults_and_options():
    from potstill.config import reference_markdown

    text = reference_markdown()
    assert "| `train.save_steps` | int, >= 0 | `0` |" in text
    assert "| `k` (`--k`) | int, >= 1 | `64` |" in text
    assert "| `selection` (`--select`) | `measured` or `even` | `measured` |" in text
    assert "| `loss.beta` | float, in [0, 1] | `0.5` |" in text
    for field in (
        "model.teacher_dtype",
        "loss.rationale_weight",
        "train.recipe",
        "train.mixed_precision",
        "data.mixing",
    ):
        assert f"`{field}`" in text


def test_save_steps_is_described_as_the_trainer_does_it():
    """0 -> save_strategy "no": no periodic checkpoint (not one at the end; only a graceful stop saves one, see
    tests/train/test_stopping.py); the student is saved either way."""
    from potstill.config import TrainConfig

    desc = TrainConfig.model_fields["save_steps"].description
    assert "0 = no periodic checkpoints" in desc and "SIGTERM" in desc and "OUT/student" in desc
    assert "only at the end" not in desc


# ----- what a run needs: validators on DistillConfig ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.train=a.jsonl"], "config: model.teacher: required unless loss.alpha=0"),
        (["data.train=a.jsonl", "teacher.source=cache"], "config: teacher.cache: required with teacher.source=cache"),
        (["model.teacher=t"], "config: data.train: at least one JSONL file is required"),
    ],
)
def test_run_checks_are_config_validators(overrides, needle):
    args = ["model.student=s", *overrides]
    assert load_config(None, args)  # a plain load (--print-config, tools filling paths in later) accepts it
    with pytest.raises(UserError, match=needle) as err:
        load_config(None, args, run=True)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=needle):
        load_config(None, args).check_runnable()


def test_runnable_configs_pass_the_run_checks():
    assert load_config(None, ["model.student=s", "loss.alpha=0", "data.train=a.jsonl"], run=True)
    cfg = load_config(None, ["model.student=s", "teacher.source=cache", "teacher.cache=c", "data.train=a.jsonl"])
    assert cfg.check_runnable() is cfg


# ----- stage configs --------------------------------------------------------------------------------------------


def test_bad_values_name_the_option_that_set_them():
    from potstill.config import CacheConfig

    base = {"teacher": "t", "data": ["d.jsonl"], "out": "o"}
    with pytest.raises(UserError, match=r"^--k must be >= 1 \(got 0\)$"):
        load_config(None, [], CacheConfig, flags={**base, "k": 0})
    with pytest.raises(UserError, match=r"^config: k: must be >= 1 \(got 0\)$"):
        load_config(None, ["k=0"], CacheConfig, flags=base)
    with pytest.raises(UserError, match=r"^--encoding must be one of compact, lossless \(got 'zip'\)$"):
        load_config(None, [], CacheConfig, flags={**base, "encoding": "zip"})
    with pytest.raises(UserError, match=r"^config: teacher: required but missing \(option --teacher\)$"):
        load_config(None, [], CacheConfig)


def _distill_yaml(tmp_path, **sections) -> Path:
    import yaml

    raw = {
        "model": {
            "student": str(tmp_path / "student"),
            "teacher": str(tmp_path / "teacher"),
            "teacher_dtype": "bfloat16",
        },
        "loss": {"temperature": 2.0},
        "teacher": {"source": "cache", "cache": str(tmp_path / "cache")},
        "data": {"train": [str(tmp_path / "train.jsonl")], "seq_len": 64, "add_bos": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cache_config_from_a_training_config_takes_the_runs_settings(tmp_path):
    from potstill.config import load_cache_config

    cfg = load_cache_config(_distill_yaml(tmp_path), ["k=16", "loss.temperature=3"], flags={"encoding": "lossless"})
    assert (cfg.teacher, cfg.student, cfg.out) == tuple(str(tmp_path / n) for n in ("teacher", "student", "cache"))
    assert cfg.data == [str(tmp_path / "train.jsonl")]
    assert (cfg.seq_len, cfg.add_bos, cfg.temperature, cfg.dtype) == (64, False, 3.0, "bfloat16")
    assert (cfg.k, cfg.encoding) == (16, "lossless")  # cache-only settings: overrides and options
    assert load_cache_config(_distill_yaml(tmp_path, model={"teacher_dtype": None})).dtype == "float32"  # model.dtype


@pytest.mark.parametrize(
    ("overrides", "flags", "needle"),
    [
        ([], {"temperature": 1.0}, "--temperature 1.0: the training config sets loss.temperature=2.0"),
        (["seq_len=128"], {}, "seq_len 128: the training config sets data.seq_len=64"),
        ([], {"add_bos": True}, "--add-bos True: the training config sets data.add_bos=False"),
        ([], {"dtype": "float32"}, "--dtype 'float32': the training config sets model.teacher_dtype (or model.dtype)"),
        ([], {"out": "elsewhere"}, "--out 'elsewhere': the training config sets teacher.cache="),
        ([], {"teacher": "other"}, "--teacher 'other': the training config sets model.teacher="),
        ([], {"data": ["other.jsonl"]}, "--data ['other.jsonl']: the training config sets data.train="),
    ],
)
def test_cache_settings_cannot_disagree_with_the_training_config(tmp_path, overrides, flags, needle):
    from potstill.config import load_cache_config

    with pytest.raises(UserError, match=re.escape(needle)) as err:
        load_cache_config(_distill_yaml(tmp_path), overrides, flags=flags)
    assert "change" in str(err.value) and "\n" not in str(err.value)


def test_cache_config_from_a_training_config_agreeing_settings_are_fine(tmp_path):
    from potstill.config import load_cache_config

    flags = {"temperature": 2.0, "seq_len": 64, "out": str(tmp_path / "cache"), "data": [str(tmp_path / "train.jsonl")]}
    assert load_cache_config(_distill_yaml(tmp_path), flags=flags).seq_len == 64
    no_cache_dir = _distill_yaml(tmp_path, teacher={"source": "online", "cache": None})
    with pytest.raises(UserError, match="out: required but missing"):
        load_cache_config(no_cache_dir)
    assert load_cache_config(no_cache_dir, flags={"out": "c"}).out == "c"


def test_cache_config_needs_the_runs_teacher_and_data(tmp_path):
    from potstill.config import load_cache_config

    with pytest.raises(UserError, match="config: model.teacher: required to build a teacher cache"):
        load_cache_config(_distill_yaml(tmp_path, model={"teacher": None}))
    with pytest.raises(UserError, match="config: data.train: at least one JSONL file is required"):
        load_cache_config(_distill_yaml(tmp_path), ["data.train=[]"])


def test_cache_build_from_a_training_config_is_the_cache_that_run_accepts(
    tmp_path, tiny_model_dir, tiny_corpus, write_jsonl, run_main
):
    """`cache build -c distill.yaml` end to end: the manifest has the run's settings and the run's check passes."""
    import json

    from transformers import AutoTokenizer

    from potstill.data.packing import load_dataset
    from potstill.teacher.cache import TeacherCache, dataset_fingerprint

    data = write_jsonl("train.jsonl", [{"text": t} for t in tiny_corpus * 2])
    run = _distill_yaml(tmp_path, model={"student": str(tiny_model_dir), "teacher": str(tiny_model_dir)})
    proc = run_main("cache", "build", "-c", run, "k=8", "shard_tokens=256", f"data.train=[{data}]")
    assert proc.returncode == 0, proc.stderr
    cache = TeacherCache(tmp_path / "cache")
    info = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (info["k"], info["temperature"], info["seq_len"], info["teacher"]["dtype"]) == (8, 2.0, 64, "bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packed = load_dataset([data], tokenizer, 64, False, False)  # packed as the run packs data.train
    cache.check(
        tokenizer=tokenizer,
        dataset_fingerprint=dataset_fingerprint(packed),
        temperature=2.0,
        teacher=str(tiny_model_dir),
    )
