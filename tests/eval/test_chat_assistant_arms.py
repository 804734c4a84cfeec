"""benchmarks/chat_assistant.py: which teacher each stage-2 arm trains with (the overrides it passes to distill)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
chat_assistant = pytest.importorskip("chat_assistant")


def args_of(arm: str) -> list[str]:
    return chat_assistant.train_args(arm, 0, Path("S"), Path("C"), Path("d.jsonl"), Path("R"), 30)


def test_kd_arm_reads_the_cache_and_sft_arm_no_teacher():
    assert args_of(chat_assistant.ARMS["kd"])[-2:] == ["teacher.source=cache", "teacher.cache=C"]
    assert not any(a.startswith("teacher.") for a in args_of(chat_assistant.ARMS["sft"]))


def test_on_policy_arm_keeps_its_own_online_teacher():
    arm = "train.recipe=on_policy teacher.source=online model.teacher=T loss.alpha=1"
    args = args_of(arm)
    assert [a for a in args if a.startswith("teacher.")] == ["teacher.source=online"]
    assert args[-len(arm.split()) :] == arm.split() and "train.seed=0" in args
