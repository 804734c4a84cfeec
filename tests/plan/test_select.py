"""`potstill teacher select` (docs/teachers.md): candidates measured, probed, ranked, reported; bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from potstill.plan.select import select_teachers, short_names
from xtok_tokenizers import metaspace_bpe

WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()


@pytest.fixture(scope="module")
def select_dir(tmp_path_factory, tiny_tokenizer, build_model) -> Path:
    """A student, two teachers of its tokenizer (one CE-trained a few steps would be slower: random ones do), one
    of another tokenizer family, and two domains of text."""
    root = tmp_path_factory.mktemp("select")
    build_model(tiny_tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=64, save_to=root / "big")
    build_model(tiny_tokenizer, 2, hidden=32, layers=1, max_positions=64, save_to=root / "small")
    build_model(metaspace_bpe(), 3, hidden=48, max_positions=128, save_to=root / "other")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(12)), "domain": "prose"} for _ in range(16)]
    rows += [{"text": " ".join(str(rng.randrange(1000)) for _ in range(10)), "domain": "digits"} for _ in range(16)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_select_measures_probes_ranks_and_reports(select_dir, tmp_path):
    out = tmp_path / "sel"
    names = ["big", "small", "other"]
    result = select_teachers(
        [select_dir / n for n in names], select_dir / "student", [select_dir / "data.jsonl"], out,
        overrides=["train.lr=0.01", "train.warmup_steps=0", "train.logging_steps=1"],
        probe_steps=2, seq_len=16, batch_size=4, eval_bytes=200,
    )  # fmt: skip
    assert sorted(result["ranking"]) == sorted(names)
    helped = [n for n in result["ranking"] if result["candidates"][n]["gain"] > 0]
    assert result["ranking"][: len(helped)] == helped  # those that beat the CE probe first, by gain per cost
    scores = [result["candidates"][n]["score"] for n in helped]
    assert scores == sorted(scores, reverse=True)
    ce = result["ce_probe"]["bpb"]
    for name in names:
        c = result["candidates"][name]
        assert c["tokenizer"] == ("cross" if name == "other" else "same")
        assert set(c["bpb_by_domain"]) == {"prose", "digits"} and c["params"] > 0 and c["ms_per_kb"] > 0
        assert c["kl_start"] > 0 and 0 < c["kl_positions"] <= 1
        assert c["gain"] == pytest.approx(ce - c["probe"]["bpb"])
        assert json.loads((Path(c["probe"]["run"]) / "summary.json").read_text())["global_step"] == 2
    assert result["candidates"]["big"]["params"] > result["candidates"]["small"]["params"]
    # the held-out records are carved from --data: no probe trained on them
    held = (out / "data" / "heldout.jsonl").read_text().splitlines()
    assert held and not set(held) & set((out / "data" / "train.jsonl").read_text().splitlines())
    md = (out / "select.md").read_text()
    assert "| 1 |" in md and "Recommendation" in md and (out / "plots" / "teacher_select.png").stat().st_size > 0
    assert json.loads((out / "select.json").read_text())["recommendation"] == result["recommendation"]


def test_candidates_are_named_by_their_shortest_distinct_path_ends():
    assert short_names([Path("/r/a/student"), Path("/r/b/student"), Path("/r/c")]) == ["a/student", "b/student", "c"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--candidates", "{root}/big", "--candidates", "{root}/big"), "big is given twice"),
        (("--candidates", "{root}/missing"), "missing"),
        (("--candidates", "{root}/big", "--data", "{one}"), "domain 'solo' has one record"),
    ],
)
def test_bad_select_input_is_one_line(
    tmp_path, tiny_tokenizer, build_model, run_main, assert_one_line_error, args, needle
):
    build_model(tiny_tokenizer, 0, hidden=32, max_positions=64, save_to=tmp_path / "student")
    build_model(tiny_tokenizer, 1, hidden=32, max_positions=64, save_to=tmp_path / "big")
    rows = [{"text": "a b c", "domain": "solo"}]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    args = [a.format(root=tmp_path, one=tmp_path / "one.jsonl") for a in args]
    data = [] if "--data" in args else ["--data", str(tmp_path / "data.jsonl")]
    proc = run_main("teacher", "select", *args, "--student", str(tmp_path / "student"), *data,
                    "--out", str(tmp_path / "o"), "--probe-steps", "1", "--seq-len", "16")  # fmt: skip
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and needle in line, line
