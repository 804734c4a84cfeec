"""The run directory of `potstill distill`: start, resume, finish, log truncation, temp-file hygiene.

A run directory holds `config.yaml` (the resolved config, written at the start), `log.jsonl` (one line per
logging step), `checkpoint-N/` (the Trainer's), `student/` (the trained student), `eval.json`, the DDK files and
`summary.json`, written last: a directory with a summary holds a finished run. Rerunning on the same directory
resumes from its last complete checkpoint, with the same config (`train.overwrite` starts over instead).

A kill can leave a temporary file of an atomic write (`potstill.fileio`, `.NAME.tmp-PID-TID`) or a checkpoint
directory the Trainer had not finished writing; neither makes the directory look foreign, and a checkpoint
without its `trainer_state.json` (written last by the Trainer) is never resumed from.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from potstill.config import DistillConfig, dump_config
from potstill.errors import UserError
from potstill.fileio import atomic_path, is_temp, temp_path, write_text_atomic
from potstill.models.vocab import ID_MAP_FILE

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
STUDENT_DIR = "student"
EVAL_FILE = "eval.json"
MIXING_FILE = "mixing.jsonl"
# Files a potstill run directory may hold besides checkpoints and temp files; anything else makes it "foreign".
RUN_FILES = {CONFIG_FILE, LOG_FILE, SUMMARY_FILE, EVAL_FILE, STUDENT_DIR, MIXING_FILE, "mixing_report.md", "plots"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


def resume_point(out: Path, cfg: DistillConfig) -> Path | None:
    """Decide (touching nothing) what to do with `out`: a checkpoint to resume from, or None for a fresh run.

    Raises:
        UserError: `out` is not a directory, holds other files, a finished run (without `train.overwrite`), or a
            run started with another config.
    """
    if not out.exists() or cfg.train.overwrite:
        if out.exists() and (not out.is_dir() or Path.cwd().resolve().is_relative_to(out.resolve())):
            raise UserError(f"{out}: refusing to overwrite (not a run directory, or it contains the current directory)")
        return None
    if not out.is_dir():
        raise UserError(f"{out}: train.output_dir exists and is not a directory")
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if n not in RUN_FILES and not _CHECKPOINT.match(n) and not is_temp(n))
    if foreign:
        raise UserError(f"{out}: output dir holds other files ({foreign[0]}, ...); pass --overwrite or another dir")
    if SUMMARY_FILE in names:
        raise UserError(f"{out}: output dir holds a finished run; pass --overwrite to replace it")
    last = last_checkpoint(out)
    if last is None:
        return None  # interrupted before its first complete checkpoint: nothing to keep, start over
    check_same_config(out / CONFIG_FILE, cfg)
    return last


def last_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step (one whose `trainer_state.json` parses), or None."""
    steps = sorted(
        ((int(m[1]), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()), reverse=True
    )
    for _, path in steps:
        try:
            json.loads((path / _STATE_FILE).read_text())
        except (OSError, ValueError):
            continue  # killed while the Trainer was writing it
        return path
    return None


def check_same_config(path: Path, cfg: DistillConfig) -> None:
    """A resumed run must use the config it started with (overwrite aside)."""
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    try:  # fields added to potstill since the run started take their defaults, as they did then
        old = DistillConfig.model_validate(old).model_dump(mode="json")
    except ValidationError:
        pass  # compared raw: the first differing field is named below
    new = cfg.model_dump(mode="json")
    for section, fields in new.items():
        for key, value in fields.items():
            if key != "overwrite" and old.get(section, {}).get(key) != value:
                raise UserError(
                    f"{path}: {section}.{key} was {old.get(section, {}).get(key)!r}, now {value!r}; "
                    "resume with the same config, or pass --overwrite"
                )


def start_run_dir(out: Path, cfg: DistillConfig, resume: Path | None) -> None:
    """Rank 0, before training: a fresh run empties `out` (an old run under overwrite) and writes config.yaml.

    A resumed run keeps everything but the leftovers of a kill: temp files, and checkpoints after the one it
    resumes from (incomplete ones; the Trainer would otherwise count them in its rotation).
    """
    if resume is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_text_atomic(out / CONFIG_FILE, dump_config(cfg))
        return
    step = int(_CHECKPOINT.match(resume.name)[1])
    for path in out.iterdir():
        m = _CHECKPOINT.match(path.name)
        if is_temp(path.name) or (m and int(m[1]) > step):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def logged_step(line: str) -> float:
    """The `step` of a JSONL log line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log after `step` (on resume they are redone), atomically."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")  # only "\n" ends a line (as in fileio.jsonl_objects)
        write_text_atomic(path, "".join(line + "\n" for line in lines if line.strip() and logged_step(line) <= step))


def save_student(trainer, dest: Path, tokenizer, student_dir: str) -> None:
    """Save the trained student as a plain HF dir (weights, tokenizer, id map) into a temp dir, then rename it.

    Every rank calls it (saving is collective under FSDP / DeepSpeed); rank 0 writes, into a temp dir whose name
    it tells the other ranks.
    """
    box = [temp_path(dest)]
    if trainer.args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    if not trainer.is_world_process_zero():
        trainer.save_model(str(box[0]))
        return
    with atomic_path(dest) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        vocab = Path(student_dir) / ID_MAP_FILE
        if vocab.is_file():
            shutil.copy2(vocab, tmp / vocab.name)
