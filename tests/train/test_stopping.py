"""A graceful stop (SIGTERM / SIGINT): the step in progress ends, a checkpoint is saved, the run exits non-zero with
one line, and the rerun of the same command ends as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from distill_helpers import make_cfg, overrides_for, read_log
from potstill.errors import Stopped
from potstill.train.recipes import run_distill

OPTS = ("train.max_steps=6", "train.scheduler=cosine", "train.warmup_steps=2")


class _SignalAt(TrainerCallback):
    """Sends `signum` to this process during optimizer step `step` (before the step ends), as a user would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            assert signal.getsignal(self.signum) is not signal.SIG_DFL, "no handler: the signal would kill pytest"
            os.kill(os.getpid(), self.signum)


def _assert_same_weights(a_dir, b_dir):
    a = AutoModelForCausalLM.from_pretrained(a_dir / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(b_dir / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("signum", "save_steps"), [(signal.SIGINT, 0), (signal.SIGTERM, 2)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_then_the_rerun_resumes(models_dir, tmp_path, signum, save_steps):
    """Signalled in step 3: checkpoint-3 is saved (also with save_steps=0, no periodic checkpoints), the run raises
    Stopped (exit 128 + signum) naming the signal and the rerun; the rerun resumes and equals the full run."""
    opts = (*OPTS, f"train.save_steps={save_steps}")
    full = run_distill(make_cfg(models_dir, tmp_path / "full", *opts))
    out = tmp_path / "stopped"
    before = signal.getsignal(signum)
    with pytest.raises(Stopped) as stopped:
        run_distill(make_cfg(models_dir, out, *opts), callbacks=[_SignalAt(3, signum)])
    assert signal.getsignal(signum) is before  # the handler is put back
    assert stopped.value.status == 128 + signum
    message = str(stopped.value)
    assert signal.Signals(signum).name in message and "after step 3" in message and "rerun the same command" in message
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "student").exists() and not (out / "summary.json").exists()

    resumed = run_distill(make_cfg(models_dir, out, *opts))
    assert json.loads((resumed / "summary.json").read_text())["global_step"] == 6
    assert read_log(resumed) == read_log(full)
    _assert_same_weights(full, resumed)


@pytest.mark.slow
def test_sigterm_to_potstill_distill(models_dir, tmp_path):
    """`potstill distill` in its own process, sent SIGTERM once its first checkpoint exists: exit 143, one line on
    stderr, a complete checkpoint, and the rerun equals an uninterrupted run."""
    # long enough that the run is still training when the signal comes; few checkpoints (each is a write)
    opts = ("train.max_steps=60", "train.save_steps=5", "train.scheduler=cosine")
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "potstill.cli", "distill", *overrides_for(models_dir, out, *opts)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-5" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # transformers may add its own warning line (checkpoints written under 1 s apart: "mtime may not be reliable")
    lines = [line for line in err.strip().splitlines() if line.startswith("potstill:")]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "rerun the same command" in lines[0], err
    step = int(lines[0].split("after step ")[1].split()[0])
    assert 5 <= step < 60, lines[0]
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert (out / f"checkpoint-{step}" / "model.safetensors").is_file()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    full = run_distill(make_cfg(models_dir, tmp_path / "full", *opts))
    assert read_log(out) == read_log(full)
    _assert_same_weights(full, out)
