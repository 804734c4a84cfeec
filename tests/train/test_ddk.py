"""DDK in `potstill distill`: Eq. 1 / Eq. 2 updates, mixing.jsonl, logs, report, resume == uninterrupted, bad input.

Tiny random Llama models (student hidden 32, teacher 64, 2 layers) over conftest's 300-token BPE; 3 domains.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import ddk_opts, interrupted_run, read_log, read_mixing
from potstill.config import load_config
from potstill.data.mixing import ddk_initial, ddk_update
from potstill.errors import UserError
from potstill.train.recipes import run_distill
from potstill.train.trainer import DistillTrainer


def test_ddk_run_follows_eq1_then_eq2_and_logs(ddk_dir, tmp_path, run_main):
    run = run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "run")))
    entries = read_mixing(run)
    assert [e["step"] for e in entries] == [0, 2, 4, 6]  # start, every K = 2 steps, final figures
    first, *rest, final = entries
    # the sampler keeps the logged weights renormalized (w / sum w): equal up to the last bit
    assert final["rule"] == "final" and final["weights"] == pytest.approx(rest[-1]["weights"], rel=1e-12)
    for e in entries:  # the gap is the student/teacher perplexity ratio of each domain
        assert e["gaps"] == pytest.approx({d: e["student"][d] / e["teacher"][d] for d in e["gaps"]})
        assert sum(e["weights"].values()) == pytest.approx(1.0)
    assert first["weights"] == pytest.approx(ddk_initial(first["gaps"]))
    previous = first["weights"]
    for e in rest:
        assert e["weights"] == pytest.approx(ddk_update(previous, e["gaps"], 0.5))
        assert min(e["weights"].values()) >= 0.5 / 3 - 1e-12  # the (1 - alpha) / N floor
        previous = e["weights"]
    assert first["teacher"] == rest[-1]["teacher"]  # measured once
    logs = read_log(run)
    assert logs[0]["weight/prose"] == pytest.approx(first["weights"]["prose"])
    assert logs[-1]["weight/code"] == pytest.approx(rest[-1]["weights"]["code"])

    # `potstill report RUN_DIR`: the weight plot and the before/after table
    assert run_main("report", run).returncode == 0
    assert (run / "plots" / "mixing_weights.png").stat().st_size > 0
    md = (run / "mixing_report.md").read_text()
    worst_after = max(final["gaps"].values())
    assert f"{worst_after:.3f} after" in md and "| code |" in md


def test_ddk_warmup_keeps_uniform_then_eq1_then_eq2_with_logppl(ddk_dir, tmp_path):
    """warmup W: uniform for W steps (step-0 gaps logged), Eq. 1 after step W, Eq. 2 every K after that."""
    extra = ("data.mixing.warmup=2", "data.mixing.gap=logppl", "train.max_steps=7")
    run = run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "run", *extra)))
    entries = read_mixing(run)
    rules = [(0, "warmup"), (2, "eq1"), (4, "eq2"), (6, "eq2"), (7, "final")]
    assert [(e["step"], e["rule"]) for e in entries] == rules
    for e in entries:  # logppl: the log of the student/teacher perplexity ratio
        assert e["gaps"] == pytest.approx({d: math.log(e["student"][d] / e["teacher"][d]) for d in e["gaps"]})
    warm, eq1, eq2 = entries[:3]
    assert warm["weights"] == pytest.approx({d: 1 / 3 for d in warm["weights"]})
    assert eq1["weights"] == pytest.approx(ddk_initial(eq1["gaps"])) and eq1["apply_from_step"] == 4
    assert eq2["weights"] == pytest.approx(ddk_update(eq1["weights"], eq2["gaps"], 0.5))
    logs = read_log(run)
    assert logs[0]["weight/code"] == pytest.approx(1 / 3)  # step 1
    assert logs[1]["weight/code"] == pytest.approx(eq1["weights"]["code"])  # step 2: set after the step


def test_report_without_mixing_is_one_line_error(tmp_path, run_main, assert_one_line_error):
    proc = run_main("report", tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "mixing.jsonl: not found")


def test_ddk_sampler_draws_by_the_weights(ddk_dir, tmp_path, monkeypatch):
    """The trainer's batches come from the DomainSampler: their domains follow Eq. 1's weights."""
    seen: list[str] = []
    original = DistillTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.extend(inputs["domain"])
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "compute_loss", spy)
    extra = ("data.mixing.mode=fixed", "data.mixing.weights={prose: 0, digits: 3, code: 1}", "train.max_steps=10")
    run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "run", *extra)))
    counts = Counter(seen)
    assert len(seen) == 20 and counts["prose"] == 0 and counts["digits"] > counts["code"]


def test_resumed_ddk_run_equals_uninterrupted(ddk_dir, tmp_path, monkeypatch):
    extra = ("train.save_steps=3",)
    full = run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "full", *extra)))
    interrupted_run(monkeypatch, load_config(None, ddk_opts(ddk_dir, tmp_path / "resumed", *extra)), step=5)
    assert [e["step"] for e in read_mixing(tmp_path / "resumed")] == [0, 2, 4]  # step 4's update is redone
    resumed = run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "resumed", *extra)))

    for a, b in zip(read_mixing(full), read_mixing(resumed), strict=True):
        assert a["step"] == b["step"]
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)
    assert [e["loss"] for e in read_log(resumed)] == pytest.approx([e["loss"] for e in read_log(full)], rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_heldout_carved_from_training_data_without_data_eval(ddk_dir, tmp_path):
    run = run_distill(load_config(None, ddk_opts(ddk_dir, tmp_path / "run", "data.eval=[]", "train.max_steps=2")))
    assert set(read_mixing(run)[0]["weights"]) == {"prose", "digits", "code"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("data.eval=[EVAL_NO_CODE]",), "no held-out data for training domain 'code'"),
        (("data.eval=[]", "data.train=[SMALL]"), "domain 'code' has 4 sequences, too few to hold out"),
        (("data.mixing.mode=fixed", "data.mixing.weights={prose: 1, digits: 1, code: 1, math: 1}"), "'math'"),
        (("data.mixing.mode=fixed", "data.mixing.weights={prose: -1, digits: 1, code: 1}"), ">= 0"),
        (("data.mixing.mode=fixed", "data.mixing.weights={prose: 0, digits: 0, code: 0}"), "sum to zero"),
        (("data.mixing.interval=0",), "data.mixing.interval"),
        (("data.mixing.warmup=-1",), "data.mixing.warmup"),
        (("loss.alpha=0",), "needs an online teacher"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ddk_dir, tmp_path, distill_error, extra, needle):
    paths = {"EVAL_NO_CODE": ddk_dir / "eval_no_code.jsonl", "SMALL": ddk_dir / "small.jsonl"}
    extra = [next((e.replace(k, str(v)) for k, v in paths.items() if k in e), e) for e in extra]
    out = tmp_path / "run"
    line = distill_error(*ddk_opts(ddk_dir, out, *extra))
    assert needle in line
    assert not out.exists()


def test_a_domain_with_no_heldout_data_is_a_user_error(ddk_dir, tmp_path):
    cfg = load_config(None, ddk_opts(ddk_dir, tmp_path / "run", f"data.eval=[{ddk_dir / 'eval_no_code.jsonl'}]"))
    with pytest.raises(UserError, match="'code'"):
        run_distill(cfg)
