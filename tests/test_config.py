"""Config loading: YAML + key=value overrides, one-line errors naming the key."""

from pathlib import Path

import pytest

from potstill.config import DistillConfig, dump_config, load_config, validate_config
from potstill.errors import UserError

CONFIG_DIR = Path(__file__).parents[1] / "src" / "potstill" / "configs"


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
