"""An on-policy run whose teacher is only a server (`teacher.source: endpoint`), end to end through `run_distill`:
with exact remote scores the sampled reverse-KL run equals the one with the same teacher in memory."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModelForCausalLM

from fake_openai import FakeServer, ModelScorer
from potstill.config import load_config
from potstill.train.recipes import run_distill

WORDS = "the cat sat on a mat with some dog and bird".split()


@pytest.fixture
def setup(tmp_path, make_model_dir):
    rng = random.Random(0)
    rows = [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(2 + i % 3)) + ":", "completion": " cat"} for i in range(9)
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return make_model_dir("student", seed=0), make_model_dir("teacher", seed=1), data


def _opts(student, data, out, *extra):
    return [
        f"model.student={student}", f"data.train=[{data}]", "data.seq_len=40", f"train.output_dir={out}",
        "train.recipe=on_policy", "train.batch_size=3", "train.lr=0.003", "train.warmup_steps=0",
        "train.logging_steps=1", "train.max_steps=2", "loss.alpha=1.0", "loss.temperature=1.0",
        "on_policy.lmbda=1.0", "on_policy.max_new_tokens=5", *extra,
    ]  # fmt: skip


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["rkl_sampled", "gkd"])
def test_endpoint_teacher_run(setup, tmp_path, tiny_tokenizer, objective):
    student, teacher, data = setup
    scorer = ModelScorer(AutoModelForCausalLM.from_pretrained(teacher), tiny_tokenizer)
    with FakeServer(scorer=scorer) as server:
        url = server.base_url
        endpoint = ["teacher.source=endpoint", f"teacher.endpoint.base_url={url}", "teacher.endpoint.model=f"]
        remote = _opts(student, data, tmp_path / "remote", f"on_policy.objective={objective}", *endpoint)
        run = run_distill(load_config(None, remote, run=True))
    assert server.bodies and all(b["echo"] and b["max_tokens"] == 0 for b in server.bodies)
    logs = _log(run)
    assert [e["step"] for e in logs] == [1, 2] and all(e["rollout_len"] >= 1 for e in logs)
    online = _log(run_distill(load_config(None, _opts(student, data, tmp_path / "online", f"model.teacher={teacher}",
                                                      f"on_policy.objective={objective}"), run=True)))  # fmt: skip
    if objective == "rkl_sampled":  # the same samples, graded by the same teacher: the same run
        for a, b in zip(online, logs, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
    else:  # gkd over the endpoint's top-K (+ one bucket) is an approximation of the full-vocabulary term
        assert all(e["kd"] >= 0 for e in logs)
