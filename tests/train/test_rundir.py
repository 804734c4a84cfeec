"""The run directory: a run killed at the wrong moment resumes, and leftovers of ours never look foreign."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from distill_helpers import make_cfg, read_log
from potstill.errors import UserError
from potstill.fileio import temp_path
from potstill.train.recipes import run_distill
from potstill.train.rundir import last_checkpoint, resume_point

OPTS = ("train.max_steps=6", "train.save_steps=2", "train.scheduler=cosine", "train.warmup_steps=2")


class _Killed(Exception):
    pass


def test_kill_while_a_checkpoint_is_written_then_resume(models_dir, tmp_path, monkeypatch):
    """Killed inside checkpoint-4 (weights and optimizer written, trainer_state.json not yet) with a temp file of
    an atomic write left behind: the rerun resumes from checkpoint-2 and ends as an uninterrupted run."""
    full = run_distill(make_cfg(models_dir, tmp_path / "full", *OPTS))
    original = Trainer._save_rng_state

    def killed_in_checkpoint_4(self, output_dir):
        if str(output_dir).endswith("checkpoint-4"):
            raise _Killed
        return original(self, output_dir)

    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", killed_in_checkpoint_4)
        with pytest.raises(_Killed):
            run_distill(make_cfg(models_dir, out, *OPTS))
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    # what a kill during an atomic write leaves: the temp name of `potstill.fileio`, from a process that is gone
    leftover = temp_path(out / "log.jsonl")
    leftover = leftover.with_name(leftover.name.replace(f"-{os.getpid()}-", "-999999999-"))
    leftover.write_text('{"step": 1')

    cfg = make_cfg(models_dir, out, *OPTS)
    assert last_checkpoint(out) == out / "checkpoint-2" and resume_point(out, cfg) == out / "checkpoint-2"
    resumed = run_distill(cfg)

    assert read_log(resumed) == read_log(full)
    assert not leftover.exists() and json.loads((resumed / "summary.json").read_text())["global_step"] == 6
    a = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_a_user_file_still_makes_the_directory_foreign(models_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".notes.tmp").write_text("mine")  # not a potstill temp name (no -PID-TID)
    with pytest.raises(UserError, match="holds other files"):
        resume_point(out, make_cfg(models_dir, out))
