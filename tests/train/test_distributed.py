"""`potstill distill` under torchrun (2 processes, gloo on CPU) == one process with grad_accum 2 (plain and DDK).

Each rank takes batch_size sequences per step, so 2 ranks x 1 micro-batch see the same global batch
as 1 process x 2 micro-batches. Loss, KD/CE parts, gradient norm and the final weights must agree, and
only rank 0 writes (one log line per step).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import ddk_opts, overrides_for, read_log, read_mixing
from potstill.config import load_config
from potstill.train.recipes import run_distill

COMPARED = ("step", "loss", "kd", "ce", "kd_weighted", "ce_weighted", "grad_norm", "learning_rate")


@pytest.mark.slow
def test_world_size_2_equals_grad_accum_2(models_dir, tmp_path, run_cli):
    opts = ("train.max_steps=3", "train.batch_size=2", "train.save_steps=0")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    proc = run_cli("distill", *overrides_for(models_dir, ddp_out, *opts), nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, overrides_for(models_dir, ref_out, *opts, "train.grad_accum=2")))

    ddp_log, ref_log = read_log(ddp_out), read_log(ref_out)
    assert len(ddp_log) == 3  # rank 0 alone writes
    for got, want in zip(ddp_log, ref_log, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    a = AutoModelForCausalLM.from_pretrained(ddp_out / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(ref_out / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    assert json.loads((ddp_out / "summary.json").read_text())["global_step"] == 3


@pytest.mark.slow
def test_ddk_under_torchrun_draws_disjoint_streams_with_the_same_weights(ddk_dir, tmp_path, run_cli):
    """DDK with 2 ranks == 1 process with grad_accum 2: each step sees the same global draws (the ranks' streams
    are disjoint halves of one stream), every update gives the same weights, and the final weights agree."""
    extra = ("train.max_steps=6", "train.batch_size=1", "train.save_steps=0", "data.mixing.gap=logppl")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    proc = run_cli("distill", *ddk_opts(ddk_dir, ddp_out, *extra), nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, ddk_opts(ddk_dir, ref_out, *extra, "train.grad_accum=2")))

    ddp_mix, ref_mix = read_mixing(ddp_out), read_mixing(ref_out)
    assert [(e["step"], e["rule"]) for e in ddp_mix] == [(e["step"], e["rule"]) for e in ref_mix]
    assert len({tuple(e["weights"].values()) for e in ref_mix}) > 1  # the weights did move
    for got, want in zip(ddp_mix, ref_mix, strict=True):
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-6)
    for got, want in zip(read_log(ddp_out), read_log(ref_out), strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
