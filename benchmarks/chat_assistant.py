"""A distilled chat assistant end to end: a Debian help desk taught by SmolLM2-135M-Instruct, measured.

Every step is the user-facing CLI run as a subprocess (docs/chat.md explains each one); a step whose output exists
is skipped, so a rerun resumes:

1. prompts: questions about the Debian packages installed here (`/var/lib/dpkg/status`: name and description), a
   help desk of a real product; held-out packages are never trained on (split by a hash of the name).
2. teacher: `potstill generate` (mode complete, local backend, chat template, greedy) writes the answers.
3. student: `potstill student init` prunes the teacher to `--layers` layers, vocabulary trimmed to the conversations.
4. train: `potstill distill` on the chat records: KD (`loss.alpha=1`, fkl) and its SFT twin (CE on the teacher's
   answers, `loss.alpha=0`), same steps, batch, lr and seed; `--seeds` seeds each.
5. eval: every student answers the held-out questions (greedy, the chat template): ROUGE-L F1 to the teacher's answers
   (`rouge_score`) and the teacher-scored reverse KL: mean over the student's answer tokens of
   KL(q_student || p_teacher) over the student's vocabulary (the teacher renormalized over the kept ids).
6. serve: `potstill serve` the best KD student, one held-out conversation streamed through the `openai` client.
7. export: `potstill export` to GGUF f16 / q8_0 (and ONNX int8); the same conversation answered by llama.cpp
   (`xllamacpp`), greedy, through the GGUF's own chat template.
8. bench: `potstill bench` on the teacher and every student format, side by side in one run.

Writes OUT/results.json and prints the tables. Needs `potstill[generate,export,chat]`.
Run: `python benchmarks/chat_assistant.py --teacher DIR [--out runs/chat] [--train 320] [--heldout 48]
[--layers 8] [--steps 150] [--seeds 0 1]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_rationales import Server, cli, read_jsonl, write_jsonl  # noqa: E402 - the shared CLI / server helpers

STATUS = Path("/var/lib/dpkg/status")
SYSTEM = "You are the help desk of a Debian system. Answer in two or three short sentences."
QUESTIONS = [
    "What is the Debian package {name} for?",
    "Do I need {name} on my system? Why would I install it?",
    "Explain in simple words what {name} does.",
    "A colleague told me to install {name}. What does it give me?",
]
DESCRIPTION_CHARS = 280  # of the long description: keeps prompts near 100 tokens


def dpkg_packages(path: Path = STATUS) -> list[dict[str, str]]:
    """(name, description) of each package paragraph of a dpkg status file; one per distinct short description."""
    seen, out = set(), []
    for para in path.read_text(errors="replace").split("\n\n"):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Description" in fields:
            short, _, long = fields["Description"].partition("\n")
            if short not in seen:
                seen.add(short)
                out.append({"name": fields["Package"], "short": short, "long": long})
    return out


def question(pkg: dict[str, str]) -> str:
    """The user's message: the package's description (the help desk's documentation) and one question about it."""
    digest = int(hashlib.sha1(pkg["name"].encode()).hexdigest(), 16)
    long = " ".join(line for line in pkg["long"].splitlines() if line.strip() != ".")
    long = " ".join(long.split())
    if len(long) > DESCRIPTION_CHARS:
        long = long[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    ask = QUESTIONS[digest % len(QUESTIONS)].format(name=pkg["name"])
    return f"Package: {pkg['name']}\nDescription: {pkg['short']}\n{long}\n\n{ask}"


def build_prompts(out: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """OUT/data/{train,heldout}_prompts.jsonl: held-out = packages whose name hashes to 0 mod 8."""
    data = out / "data"
    train, held = data / "train_prompts.jsonl", data / "heldout_prompts.jsonl"
    if train.exists() and held.exists():
        return train, held
    data.mkdir(parents=True, exist_ok=True)
    pkgs = sorted(dpkg_packages(), key=lambda p: hashlib.sha1(p["name"].encode()).hexdigest())
    is_held = [int(hashlib.sha1(p["name"].encode()).hexdigest(), 16) % 8 == 0 for p in pkgs]
    rows = [{"prompt": question(p), "package": p["name"], "domain": "debian"} for p in pkgs]
    held_rows = [r for r, h in zip(rows, is_held) if h][:n_heldout]
    train_rows = [r for r, h in zip(rows, is_held) if not h][:n_train]
    write_jsonl(held, held_rows)
    write_jsonl(train, train_rows)
    return train, held


def teacher_answers(out: Path, teacher: Path, prompts: Path, max_tokens: int) -> tuple[Path, float]:
    """`potstill generate` (complete, local, chat template, greedy) on `prompts` -> OUT/data/NAME_teacher.jsonl."""
    name = prompts.stem.replace("_prompts", "")
    answers = out / "data" / f"{name}_teacher.jsonl"
    summary = answers.with_name(answers.name + ".summary.json")
    if summary.exists():
        return answers, json.loads(summary.read_text()).get("wall_s", 0.0)
    config = {
        "mode": "complete",
        "inputs": [str(prompts)],
        "output": str(answers),
        "teacher": {"backend": "local", "model": str(teacher), "chat": True, "system": SYSTEM, "batch_size": 8},
        "sampling": {"temperature": 0.0, "max_tokens": max_tokens},
    }
    cfg = out / "data" / f"generate_{name}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    _, wall = cli("generate", "-c", str(cfg), env={"OMP_NUM_THREADS": "1"})
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"wall_s": round(wall, 1)}, indent=2))
    return answers, wall


def whole_sentences(text: str) -> str:
    """An answer cut by max_tokens ends at its last complete sentence (a student should not learn to stop mid-word)."""
    text = text.strip()
    if re.search(r"[.!?)`]$", text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[: ends[-1]].strip() if ends else text


def chat_records(answers: Path, out_path: Path) -> Path:
    """Teacher answers -> chat records {"messages": [system, user, assistant]} (what `potstill distill` trains on)."""
    rows = []
    for r in read_jsonl(answers):
        turns = [("system", SYSTEM), ("user", r["prompt"]), ("assistant", whole_sentences(r["completion"]))]
        rows.append({"messages": [{"role": a, "content": b} for a, b in turns], "domain": "debian"})
    return write_jsonl(out_path, rows)
