"""The no-download corpus: domains, deterministic split without leaks, caps, JSONL readable by potstill.data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from potstill.data import read_jsonl
from potstill.data.corpus import DOMAINS, build_corpus, file_docstrings, split_score, stdlib_files


def _fake_stdlib(root: Path, n_files: int = 40) -> Path:
    """A small stand-in for the standard library: modules with docstrings, plus dirs the corpus must skip."""
    for i in range(n_files):
        pkg = root / f"pkg{i % 4}"
        pkg.mkdir(parents=True, exist_ok=True)
        body = "".join(
            f'def f{j}(x):\n    """Return x plus {j} in zqmod{i}."""\n    return x + {j}\n\n' for j in range(30)
        )
        (pkg / f"mod{i}.py").write_text(f'"""Module number {i}."""\n\n{body}')
    for skipped in ("test", "site-packages", "encodings"):
        (root / skipped).mkdir()
        (root / skipped / "skipme.py").write_text('"""SKIPPED."""\nx = 1\n')
    return root


@pytest.fixture
def stdlib(tmp_path: Path) -> Path:
    return _fake_stdlib(tmp_path / "lib")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_domains_and_files_skipped(stdlib: Path, tmp_path: Path):
    stats = build_corpus(tmp_path / "c", root=stdlib, train_bytes=30_000, heldout_bytes=5_000, doc_bytes=1_000)
    assert set(stats["domains"]) == set(DOMAINS)
    assert all(stats["domains"][d][s]["bytes"] > 0 for d in DOMAINS for s in ("train", "heldout"))
    rows = _read(tmp_path / "c" / "train.jsonl") + _read(tmp_path / "c" / "heldout.jsonl")
    assert not any("SKIPPED" in r["text"] for r in rows)
    assert all(p.name.startswith("mod") for p in stdlib_files(stdlib))


def test_deterministic_and_seed_dependent(stdlib: Path, tmp_path: Path):
    kw = {"root": stdlib, "train_bytes": 20_000, "heldout_bytes": 4_000, "doc_bytes": 1_000}
    build_corpus(tmp_path / "a", seed=1, **kw)
    build_corpus(tmp_path / "b", seed=1, **kw)
    build_corpus(tmp_path / "c", seed=2, **kw)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "heldout.jsonl").read_bytes() != (tmp_path / "c" / "heldout.jsonl").read_bytes()


def test_no_overlap_between_splits_in_any_domain(stdlib: Path, tmp_path: Path):
    build_corpus(tmp_path / "c", root=stdlib, heldout_frac=0.3, train_bytes=10**7, heldout_bytes=10**7, doc_bytes=500)
    train, held = _read(tmp_path / "c" / "train.jsonl"), _read(tmp_path / "c" / "heldout.jsonl")

    # Every module's code and docstrings carry its unique number: a module is in one split only, in all domains.
    def modules(rows):
        return {m for r in rows for m in re.findall(r"zqmod\d+", r["text"])}

    assert modules(train) and modules(held)
    assert not modules(train) & modules(held)
    assert not {r["text"] for r in train} & {r["text"] for r in held}


def test_caps_per_domain_and_split(stdlib: Path, tmp_path: Path):
    stats = build_corpus(tmp_path / "c", root=stdlib, train_bytes=6_000, heldout_bytes=2_000, doc_bytes=800)
    for split, cap in (("train", 6_000), ("heldout", 2_000)):
        rows = _read(tmp_path / "c" / f"{split}.jsonl")
        for domain in DOMAINS:
            size = sum(len(r["text"].encode()) for r in rows if r["domain"] == domain)
            assert size == stats["domains"][domain][split]["bytes"]
            assert cap - 800 < size <= cap  # filled up to the cap, within one piece
            assert all(len(r["text"].encode()) <= 800 for r in rows if r["domain"] != "docs")


def test_readable_by_potstill_data(stdlib: Path, tmp_path: Path):
    build_corpus(tmp_path / "c", root=stdlib, train_bytes=5_000, heldout_bytes=2_000)
    records = read_jsonl(tmp_path / "c" / "heldout.jsonl")
    assert {r.domain for r in records} == set(DOMAINS)
    assert all(r.text for r in records)


def test_docstrings_in_source_order():
    src = (
        '"""Top."""\nclass A:\n    """Class A."""\n    def m(self):\n        """Method m."""\n'
        'def g():\n    """Func g."""\n'
    )
    assert file_docstrings(src) == ["Top.", "Class A.", "Method m.", "Func g."]


def test_split_score_uniform_range():
    scores = [split_score(0, f"k{i}") for i in range(2000)]
    assert all(0 <= s < 1 for s in scores)
    assert 0.07 < sum(s < 0.1 for s in scores) / len(scores) < 0.13
