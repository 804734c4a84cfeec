"""benchmarks/on_policy_arena.py: the task rows (addition, reversal) and the teacher's recovery rows."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
arena = pytest.importorskip("on_policy_arena")


@pytest.mark.parametrize(("task", "digits"), [("add", 2), ("reverse", 3), ("reverse", 6)])
def test_pairs_are_right_and_distinct(task, digits):
    pairs = arena.task_pairs(task, digits)
    assert len({p for p, _ in pairs}) == len(pairs) > 500
    for prompt, answer in pairs[:200]:
        x = prompt[:-1]
        total = sum(int(n) for n in x.split("+"))
        assert answer == (f"{total:0{digits + 1}d}" if task == "add" else x[::-1])
        assert len(prompt) == len(pairs[0][0]) and len(answer) == len(pairs[0][1])


def test_recovery_rows_keep_length_and_true_labels():
    rng = random.Random(0)
    for _ in range(300):
        prompt, completion = arena.corrupt("12345678=", "87654321", rng)
        prefix = prompt[len("12345678=") :]
        assert 1 <= len(prefix) <= 7 and prefix + completion != "87654321"
        assert completion == "87654321"[len(prefix) :]  # the labels never follow the error


def test_make_task_splits_and_teacher_rows(tmp_path):
    train, val, teacher, held, val_pairs = arena.make_task(tmp_path, 4, 100, 50, task="reverse", corrupt_p=0.5)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    t_rows = [json.loads(line) for line in teacher.read_text().splitlines()]
    assert len(rows) == len(t_rows) == 10**4 - 150 and len(held) == 100 and len(val_pairs) == 50
    prompts = {r["prompt"] for r in rows} | {p for p, _ in held} | {p for p, _ in val_pairs}
    assert len(prompts) == 10**4  # disjoint splits
    recovery = [t for t in t_rows if len(t["prompt"]) > 5]
    assert 0.45 < len(recovery) / len(t_rows) < 0.55
    assert all(len(t["prompt"] + t["completion"]) == 9 for t in t_rows)
    clean = [t for t in t_rows if len(t["prompt"]) == 5]  # the other rows are the training rows, unchanged
    assert [r for r, t in zip(rows, t_rows, strict=True) if len(t["prompt"]) == 5] == clean


def test_score_rows_exact_char_edit_and_recovery():
    eos = 2
    answers = [[5, 6, 7, 8]] * 5
    rows = [
        [5, 6, 7, 8, eos],  # right
        [5, 9, 7, 8, eos],  # one wrong, recovers: 2 of the 2 later positions right; 1 substitution
        [9, 9, 9, 9, eos],  # wrong throughout: 0 of 3; 4 substitutions
        [5, 6, eos, 0, 0],  # stops early: positions 2, 3 missing, 0 of 1 after the first miss; 2 deletions
        [6, 7, 8, eos, 0],  # drops the first character: no position right, but 1 edit away (shift)
    ]
    sc = arena.score_rows(rows, answers, eos)
    assert sc["exact"] == 0.2
    assert sc["char"] == (4 + 3 + 0 + 2 + 0) / 20
    assert sc["recovery"] == (2 + 0 + 0 + 0) / (2 + 3 + 1 + 3)
    assert sc["edit"] == pytest.approx((0 + 1 / 4 + 4 / 4 + 2 / 4 + 1 / 4) / 5)
    # no <eos> within the budget: the row is the answer; an extra token is one insertion
    assert arena.score_rows([[5, 6, 7, 8]], answers[:1], eos) == {"exact": 1, "char": 1, "edit": 0, "recovery": 0}
    assert arena.score_rows([[5, 6, 7, 8, 8]], answers[:1], eos)["edit"] == pytest.approx(1 / 5)


def test_paired_differences_and_beats():
    d = arena.paired([0.6, 0.6, 0.7], [0.3, 0.45, 0.4])
    assert d["diffs"] == pytest.approx([0.3, 0.15, 0.3]) and d["mean"] == pytest.approx(0.25)
    assert (d["min"], d["max"]) == pytest.approx((0.15, 0.3))
    assert d["half"] == pytest.approx(4.302653 * 0.0075**0.5 / 3**0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert d["beats"]  # one-signed, and the mean 0.25 > the reference's spread 0.15
    assert not arena.paired([0.6, 0.6, 0.7], [0.2, 0.45, 0.5])["beats"]  # one-signed, but mean 0.25 < spread 0.3
    assert not arena.paired([0.5, 0.4], [0.3, 0.5])["beats"]  # not one-signed
    # lower is better (edit distance): the arm beats when every difference is negative enough
    assert arena.paired([0.1, 0.1], [0.3, 0.35], lower_better=True)["beats"]
    assert not arena.paired([0.1, 0.1], [0.3, 0.35])["beats"]


def test_a_work_dir_refuses_other_settings(tmp_path):
    settings = {k: 1 for k in arena.WORK_SETTINGS} | {"student": "24x2"}
    arena.claim_work(tmp_path, settings)
    arena.claim_work(tmp_path, dict(settings))  # the same settings: its runs are reused
    with pytest.raises(
        SystemExit, match=r"^on_policy_arena: --work .* holds runs made with --student 24x2 \(now 16x2\);"
    ):
        arena.claim_work(tmp_path, settings | {"student": "16x2"})
