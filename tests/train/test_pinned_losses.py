"""Regression pin: the first per-step losses of a tiny seeded run, as recorded before the `train/` restructure.

A refactor that changes the numbers (normalization, T^2, the fused path, the order of random draws) fails here,
as torchtune's recipe tests do. The values were printed by the pre-restructure trainer (commit 29a98b6) for the
same models, data and config; fused and dense agree with them to float32 rounding.
"""

from __future__ import annotations

import json
import random

import pytest

from potstill.config import load_config
from potstill.train.recipes import run_distill

WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()
# (loss, kd, ce) of optimizer steps 1, 2, 3
PINNED = {
    "fused": [(2.854292392730713, 0.003146519768051803, 5.695998430252075),
              (2.791494846343994, 0.0030056614195927978, 5.570967435836792),
              (2.7581119537353516, 0.0030396311776712537, 5.504065036773682)],
    "dense": [(2.854292154312134, 0.0031465196516364813, 5.695998191833496),
              (2.791494846343994, 0.003005661303177476, 5.570966958999634),
              (2.7581119537353516, 0.003039631061255932, 5.504065036773682)],
    "ce_only": [(5.695998191833496, 0.0, 5.695998430252075),
                (5.571698188781738, 0.0, 5.571698427200317),
                (5.503070831298828, 0.0, 5.503070592880249)],
}  # fmt: skip
EXTRA = {"fused": [], "dense": ["loss.fused=false"], "ce_only": ["loss.alpha=0.0"]}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_tokenizer, build_model):
    root = tmp_path_factory.mktemp("pinned")
    for name, seed in (("student", 0), ("teacher", 1)):
        build_model(tiny_tokenizer, seed, save_to=root / name)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(12))} for _ in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.mark.parametrize("arm", PINNED)
def test_first_step_losses_are_pinned(seeded, arm):
    cfg = load_config(None, [
        f"model.student={seeded / 'student'}", f"model.teacher={seeded / 'teacher'}",
        f"data.train=[{seeded / 'train.jsonl'}]", "data.seq_len=16", f"train.output_dir={seeded / arm}",
        "train.batch_size=2", "train.grad_accum=2", "train.lr=0.003", "train.warmup_steps=0", "train.logging_steps=1",
        "train.max_steps=3", "loss.temperature=2.0", "loss.alpha=0.5", *EXTRA[arm],
    ])  # fmt: skip
    out = run_distill(cfg)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    got = [value for e in logs for value in (e["loss"], e["kd"], e["ce"])]
    # flat: pytest.approx does not compare nested sequences approximately
    assert got == pytest.approx([value for step in PINNED[arm] for value in step], rel=2e-5, abs=1e-7)
