"""`potstill distill` under torchrun / `accelerate launch` (2 processes, gloo on CPU) == one process with grad_accum 2
(plain KD, through the shipped DDP config, a cached teacher, DDK, the on-policy recipe), and `potstill cache build`
under torchrun == one process.

Each rank takes batch_size sequences per step, so 2 ranks x 1 micro-batch see the same global batch
as 1 process x 2 micro-batches. Loss, KD/CE parts, gradient norm and the final weights must agree, and
only rank 0 writes (one log line per step). All slow: each multi-process run is a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

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
    assert_same_run(ddp_out, ref_out, steps=3)


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


def assert_same_run(got: Path, want: Path, steps: int, keys=COMPARED) -> None:
    """`got` (2 processes) logged what `want` (one) did at every step and ended with its weights."""
    got_log, want_log = read_log(got), read_log(want)
    assert len(got_log) == steps  # rank 0 alone writes
    for a, b in zip(got_log, want_log, strict=True):
        assert a.keys() == b.keys()
        for key in (k for k in keys if k in b):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    a = AutoModelForCausalLM.from_pretrained(got / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(want / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    summary = json.loads((got / "summary.json").read_text())
    assert summary["global_step"] == steps and summary["engine"]["processes"] == 2


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_ddp_config_equals_one_process(models_dir, tmp_path):
    """`accelerate launch --config_file potstill/configs/accelerate/ddp.yaml` (2 processes; on CPU accelerate makes
    it MULTI_CPU over gloo) == one process with grad_accum 2."""
    opts = ("train.max_steps=3", "train.batch_size=2", "train.save_steps=0")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    config = resources.files("potstill") / "configs" / "accelerate" / "ddp.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "potstill.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    args = ["distill", *overrides_for(models_dir, ddp_out, *opts)]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, overrides_for(models_dir, ref_out, *opts, "train.grad_accum=2")))
    assert_same_run(ddp_out, ref_out, steps=3)
    assert json.loads((ddp_out / "summary.json").read_text())["engine"]["type"] == "MULTI_CPU"


@pytest.mark.slow
def test_cached_teacher_under_torchrun_equals_one_process(models_dir, tmp_path, run_cli):
    """A top-k teacher cache (`potstill cache build`) read by 2 ranks, each looking up its own sequences' targets."""
    from potstill.teacher.cache import build_cache

    cache = build_cache(models_dir / "teacher", [models_dir / "train.jsonl"], tmp_path / "cache", k=16,
                        temperature=2.0, seq_len=16, student=models_dir / "student", progress=False)  # fmt: skip
    opts = ("train.max_steps=3", "train.batch_size=2", "train.save_steps=0", "teacher.source=cache",
            f"teacher.cache={cache}", "model.teacher=null")  # fmt: skip
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    proc = run_cli("distill", *overrides_for(models_dir, ddp_out, *opts), nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, overrides_for(models_dir, ref_out, *opts, "train.grad_accum=2")))
    assert_same_run(ddp_out, ref_out, steps=3)


@pytest.mark.slow
def test_on_policy_under_torchrun_equals_one_process(models_dir, tmp_path, run_cli, prompt_rows):
    """On-policy with the replay buffer: 2 ranks sample what one process with grad_accum 2 samples (seeds by the
    micro-batch's place in the global batch), keep the same buffer (the run replays after step 2), log the rollouts
    of both ranks, and end with the same weights."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(16)))
    opts = (f"data.train=[{prompts}]", "data.seq_len=40", "train.recipe=on_policy", "train.max_steps=4",
            "train.batch_size=2", "loss.alpha=1.0", "loss.name=srkl", "on_policy.max_new_tokens=4",
            "on_policy.lmbda=0.7", "on_policy.replay_size=4", "on_policy.replay_ratio=0.5")  # fmt: skip
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    proc = run_cli("distill", *overrides_for(models_dir, ddp_out, *opts), nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, overrides_for(models_dir, ref_out, *opts, "train.grad_accum=2")))
    health = ("on_policy_fraction", "replay_fraction", "rollout_len", "rollout_eos_rate", "rollout_distinct2")
    assert_same_run(ddp_out, ref_out, steps=4, keys=(*COMPARED, *health))
    assert any(e["replay_fraction"] > 0 for e in read_log(ref_out))  # the buffer was drawn from


@pytest.mark.slow
def test_cross_tokenizer_under_torchrun_equals_one_process(tmp_path, build_model, run_cli):
    """A teacher of another tokenizer family: the same losses and weights, and the alignment figures of the data
    (`xtok_*`) averaged over both ranks' micro-batches, as one process averages over its two."""
    from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe

    build_model(byte_level_bpe(), 0, hidden=32, max_positions=64, save_to=tmp_path / "student")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=64, save_to=tmp_path / "teacher")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    opts = ("data.seq_len=24", "train.max_steps=3", "train.batch_size=2", "train.save_steps=0", "loss.alpha=0.5")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    proc = run_cli("distill", *overrides_for(tmp_path, ddp_out, *opts), nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_distill(load_config(None, overrides_for(tmp_path, ref_out, *opts, "train.grad_accum=2")))
    xtok = [key for key in read_log(ref_out)[0] if key.startswith("xtok_")]
    assert xtok
    assert_same_run(ddp_out, ref_out, steps=3, keys=(*COMPARED, *xtok))


@pytest.mark.slow
def test_fsdp_full_shard_on_gloo_kd_steps_equal_one_process(models_dir, tmp_path):
    """FSDP2 full shard over 2 gloo ranks (each decoder layer and the root sharded), 3 AdamW steps of the dense KD
    step with the global-count normalization: the gathered weights equal one process's with both micro-batches.
    accelerate runs FSDP only on GPUs, so this checks potstill's loss under sharding, not the Trainer's wiring."""
    import fsdp_kd_worker as worker

    out = tmp_path / "fsdp.pt"
    script = Path(worker.__file__)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [str(script), str(models_dir / "student"), str(models_dir / "teacher"), str(out)]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    student = AutoModelForCausalLM.from_pretrained(models_dir / "student")
    vocab = student.config.vocab_size
    worker.train(student, str(models_dir / "teacher"), worker.micro_batches(vocab), 1, vocab)
    sharded, start = torch.load(out, weights_only=True), AutoModelForCausalLM.from_pretrained(models_dir / "student")
    for key, value in student.state_dict().items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(sharded["lm_head.weight"], start.state_dict()["lm_head.weight"])  # it did train


@pytest.mark.slow
def test_cache_build_under_torchrun_writes_the_same_cache(models_dir, tmp_path, run_cli):
    """2 processes (shard j by rank j % 2, rank 0 the manifest) write the bytes one process writes."""
    args = ("cache", "build", "--teacher", models_dir / "teacher", "--data", models_dir / "train.jsonl", "--k", "8",
            "--seq-len", "16", "--shard-tokens", "64", "--batch-size", "2")  # fmt: skip
    two = run_cli(*args, "--out", tmp_path / "two", nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]

    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len([n for n in names if n.startswith("shard-")]) > 2  # both ranks had shards to write
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    one_manifest, two_manifest = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    for key in (set(one_manifest) | set(two_manifest)) - {"created", "manifest_sha256"}:
        assert one_manifest.get(key) == two_manifest.get(key), key
    assert run_cli("cache", "verify", tmp_path / "two").returncode == 0
