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


def test_score_rows_exact_char_and_recovery():
    eos = 2
    answers = [[5, 6, 7, 8]] * 4
    rows = [
        [5, 6, 7, 8, eos],  # right
        [5, 9, 7, 8, eos],  # one wrong, recovers: 2 of the 2 later positions right
        [9, 9, 9, 9, eos],  # wrong throughout: 0 of 3
        [5, 6, eos, 0, 0],  # stops early: positions 2, 3 missing, 0 of 1 after the first miss
    ]
    exact, char, recovery = arena.score_rows(rows, answers, eos)
    assert exact == 0.25
    assert char == (4 + 3 + 0 + 2) / 16
    assert recovery == (2 + 0 + 0) / (2 + 3 + 1)
    assert arena.score_rows([[5, 6, 7, 8]], answers[:1], eos) == (1.0, 1.0, 0.0)  # no <eos> within the budget
