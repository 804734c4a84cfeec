"""Fixtures of the training tests (`models_dir` and the rest are in tests/conftest.py):

- `ddk_dir` (one per module): models_dir's student and teacher (the same seeds and configs) and JSONL files of 3
  domains for DDK runs;
- `pruned` (one per module): a 4-layer teacher (hidden 64) and a 2-layer student cut from it (layers 0 and 3);
- `distill_error(*args)`: `potstill distill ARGS` in this process as a user mistake: its one error line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from potstill.student.init import init_student_cli

WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()


def _domain_text(domain: str, rng: random.Random) -> str:
    if domain == "prose":
        return " ".join(rng.choice(WORDS) for _ in range(12))
    if domain == "digits":
        return " ".join(str(rng.randrange(1000)) for _ in range(10))
    return "def add(a, b):\n    return a + b\n" * 2


def _write_domains(path: Path, domains: dict[str, int], seed: int) -> Path:
    rng = random.Random(seed)
    rows = [{"text": _domain_text(d, rng), "domain": d} for d, n in domains.items() for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ddk_dir(tmp_path_factory, tiny_tokenizer, build_model) -> Path:
    """models_dir's student and teacher, and JSONL files of 3 domains (prose, digits, code) for DDK runs."""
    root = tmp_path_factory.mktemp("ddk")
    build_model(tiny_tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=64, save_to=root / "teacher")
    _write_domains(root / "train.jsonl", {"prose": 12, "digits": 12, "code": 12}, seed=0)
    _write_domains(root / "eval.jsonl", {"prose": 3, "digits": 3, "code": 3}, seed=1)
    _write_domains(root / "eval_no_code.jsonl", {"prose": 3, "digits": 3}, seed=1)
    _write_domains(root / "small.jsonl", {"prose": 12, "digits": 12, "code": 1}, seed=2)
    return root


@pytest.fixture
def distill_error(run_main, assert_one_line_error):
    """distill_error(*args) -> the error line of `potstill distill ARGS` run in this process, which must fail with
    exit status 2 and one line on stderr starting "potstill: error: "."""

    def run(*args) -> str:
        proc = run_main("distill", *args)
        line = assert_one_line_error(proc)
        assert proc.returncode == 2 and line.startswith("potstill: error: "), proc.stderr
        return line

    return run


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_tokenizer, build_model, models_dir):
    """A 4-layer teacher (hidden 64) and a 2-layer student cut from it (layers 0 and 3), with models_dir's data."""
    root = tmp_path_factory.mktemp("pruned")
    build_model(tiny_tokenizer, 1, hidden=64, layers=4, max_positions=64, save_to=root / "teacher")
    init_student_cli(root / "teacher", 2, root / "student", [], trim_vocab=False, selection="even")
    (root / "train.jsonl").write_text((models_dir / "train.jsonl").read_text())
    return root


def prompt_rows(n: int) -> list[dict]:
    """n seeded prompt/completion records of a few WORDS (the first rows are the same for any n)."""
    rng = random.Random(0)
    return [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(2 + i % 3)) + ":", "completion": " " + rng.choice(WORDS)}
        for i in range(n)
    ]


@pytest.fixture(name="prompt_rows", scope="session")
def prompt_rows_fixture():
    """prompt_rows(n) -> n seeded prompt/completion records (on-policy tests)."""
    return prompt_rows


@pytest.fixture
def prompts(tmp_path):
    """A JSONL file of the 12 first `prompt_rows`."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(12)))
    return path


@pytest.fixture
def pair(make_model_dir):
    """(student dir, teacher dir): tiny models of seeds 0 and 1."""
    return make_model_dir("student", seed=0), make_model_dir("teacher", seed=1)
