"""potstill.launch: an FSDP or DeepSpeed launch on a machine without GPUs is refused before anything loads
(accelerate would quietly train it as plain DDP)."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import UserError
from potstill.launch import check_engine


@pytest.mark.parametrize(
    ("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")]
)
def test_sharded_engine_without_gpus_is_refused(monkeypatch, variable, engine):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UserError, match=f"distributed_type {engine}: .* only on GPUs"):
        check_engine(gpus=False)
    check_engine(gpus=True)  # what accelerate runs them on
    monkeypatch.setenv(variable, "false")
    check_engine(gpus=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_distill_under_an_fsdp_config_is_one_line_and_writes_nothing(
    tmp_path, monkeypatch, run_main, assert_one_line_error
):
    """Refused before any model or data is read (these paths do not even exist)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    out = tmp_path / "run"
    proc = run_main(
        "distill", f"model.student={tmp_path / 'student'}", f"model.teacher={tmp_path / 'teacher'}",
        f"data.train=[{tmp_path / 'train.jsonl'}]", f"train.output_dir={out}",
    )  # fmt: skip
    assert_one_line_error(proc, "distributed_type FSDP", "ddp.yaml")
    assert proc.returncode == 2 and not out.exists()
