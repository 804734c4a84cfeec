"""Reverse KL over the teacher's top-K (`on_policy.objective: rkl_topk`) with a teacher that is only a server."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModelForCausalLM

from fake_openai import FakeServer, ModelScorer
from potstill.config import load_config
from potstill.train.recipes import run_distill

WORDS = "the cat sat on a mat with some dog and bird".split()


def _run(student, teacher, data, out, *extra):
    opts = [
        f"model.student={student}", f"data.train=[{data}]", "data.seq_len=40", f"train.output_dir={out}",
        "train.recipe=on_policy", "train.batch_size=3", "train.lr=0.003", "train.warmup_steps=0",
        "train.logging_steps=1", "train.max_steps=2", "loss.alpha=1.0", "loss.temperature=1.0", "on_policy.lmbda=1.0",
        "on_policy.max_new_tokens=5", "on_policy.objective=rkl_topk", "on_policy.top_k=20", *extra,
    ]  # fmt: skip
    run = run_distill(load_config(None, opts, run=True))
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rkl_topk_over_an_endpoint_equals_the_teacher_in_memory(tmp_path, make_model_dir, tiny_tokenizer):
    """The endpoint's top-20 with exact log-probs gives the run of the in-memory teacher's top-20."""
    rng = random.Random(0)
    rows = [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(2 + i % 3)) + ":", "completion": " cat"} for i in range(9)
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student, teacher = make_model_dir("student", seed=0), make_model_dir("teacher", seed=1)
    online = _run(student, teacher, data, tmp_path / "online", f"model.teacher={teacher}")
    scorer = ModelScorer(AutoModelForCausalLM.from_pretrained(teacher), tiny_tokenizer)
    with FakeServer(scorer=scorer) as server:
        endpoint = [
            "teacher.source=endpoint",
            f"teacher.endpoint.base_url={server.base_url}",
            "teacher.endpoint.model=f",
        ]
        remote = _run(student, teacher, data, tmp_path / "remote", *endpoint)
    assert server.bodies
    for a, b in zip(online, remote, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-3, abs=1e-5)
