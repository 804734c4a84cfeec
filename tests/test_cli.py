"""The CLI surface: every command answers --help, --version works, bad options are one-line errors."""

import pytest

from clitools import assert_one_line_error, run_cli
from potstill import __version__

COMMANDS = [
    [],
    ["distill"],
    ["eval"],
    ["losses"],
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
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_answers_help(cmd):
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"potstill {__version__}"


def test_print_config_applies_overrides():
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
def test_bad_config_is_one_line(override, needle):
    assert_one_line_error(run_cli("distill", "--print-config", "model.student=s", override), needle)
