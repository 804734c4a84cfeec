"""The bad-input catalog: every user-facing command given a wrong file, option, config, model or data.

Each case runs `potstill ARGS` in this process and asserts what docs/reliability.md promises: exit status 2, one
line on stderr starting "potstill: error: " that names the culprit (the needles), no traceback, and no file of
the workspace changed, added or removed (inputs, earlier outputs, the run directory that would have been
written). The workspace is built once per module (`ws`); a case that needs its own files gets a fresh copy of
the cases' directory `tmp_path` (prepared by its `setup`).

The list `CASES` is the catalog; docs/reliability.md lists it, and `test_docs_list_every_case` keeps the two
in step. Add a case here, then its line there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Case:
    """One bad input: `argv(ws, tmp)` -> the command line; `needles` must all be in the error line."""

    name: str
    argv: Callable[[Path, Path], list]
    needles: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = field(default=None)


def _run_args(ws: Path, tmp: Path, *extra: str) -> list[str]:
    """A small distill run over the workspace's tiny models into tmp/run."""
    return [
        "distill",
        f"model.student={ws / 'student'}",
        f"model.teacher={ws / 'teacher'}",
        f"data.train=[{ws / 'train.jsonl'}]",
        "data.seq_len=16",
        f"train.output_dir={tmp / 'run'}",
        "train.batch_size=2",
        "train.max_steps=1",
        *extra,
    ]


def _eval(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        ws / "student",
        "--data",
        ws / "train.jsonl",
        "--out",
        tmp / "eval",
        "--seq-len",
        "16",
        *extra,
    ]


def _init(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "student",
        "init",
        "--teacher",
        ws / "teacher",
        "--layers",
        "1",
        "--select",
        "even",
        "--no-trim-vocab",
        "--out",
        tmp / "new-student",
        *extra,
    ]


def _build(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "cache",
        "build",
        "--teacher",
        ws / "teacher",
        "--data",
        ws / "train.jsonl",
        "--out",
        tmp / "cache",
        "--seq-len",
        "16",
        "--k",
        "4",
        *extra,
    ]


def _generate(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "generate",
        f"inputs={ws / 'rows.jsonl'}",
        f"output={tmp / 'gen.jsonl'}",
        f"teacher.model={ws / 'teacher'}",
        "sampling.max_tokens=2",
        *extra,
    ]


def _on_policy(ws: Path, tmp: Path, *extra: str) -> list[str]:
    """A small on-policy run over the workspace's prompt rows."""
    return [
        *_run_args(ws, tmp, f"data.train=[{ws / 'prompts.jsonl'}]", "data.seq_len=40"),
        "train.recipe=on_policy",
        "loss.alpha=1.0",
        *extra,
    ]


def _export(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return ["export", ws / "student", "--format", "onnx", "--out", tmp / "student.onnx", *extra]


def _select(ws: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "teacher",
        "select",
        "--candidates",
        ws / "teacher",
        "--student",
        ws / "student",
        "--data",
        ws / "train.jsonl",
        "--out",
        tmp / "select",
        *extra,
    ]


def _copy_tree_and_flip(rel: str, file: str) -> Callable[[Path, Path], None]:
    """Copy the workspace's directory `rel` to tmp and flip one bit of its `file` (bit rot)."""

    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / rel, tmp / rel)
        path = tmp / rel / file
        path.write_bytes(_flip(path.read_bytes()))

    return setup


def _write(rel: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """Copy the workspace's cache to tmp/cache and edit its manifest.json by hand (as a user might)."""

    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "cache", tmp / "cache")
        manifest = json.loads((tmp / "cache" / "manifest.json").read_text())
        change(manifest)
        (tmp / "cache" / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return setup


def _edit_shard(change: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "cache", tmp / "cache")
        shard = tmp / "cache" / "shard-00000.bin"
        shard.write_bytes(change(shard.read_bytes()))

    return setup


def _copy_cache_and(then: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "cache", tmp / "cache")
        then(ws, tmp)

    return setup


def _flip(data: bytes) -> bytes:
    return data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:]


NOT_UTF8 = b'{"text": "caf\xe9"}\n'
# two records of ours; in the second, one bit of a comma flipped (0x2c -> 0x2d): the line is no longer JSON
FLIPPED_RECORDS = (
    b'{"prompt": "a", "source": "in.jsonl:1", "sample": 0}\n{"prompt": "b"- "source": "in.jsonl:2", "sample": 0}\n'
)
UNRELATED = b'{"id": 1, "note": "mine"}\n{"id": 2, "note": "no newline at the end"}'
CASES = [
    # ---- distill: config values and files ----
    Case("distill: infinite learning rate", lambda ws, t: _run_args(ws, t, "train.lr=.inf"), ("train.lr", "finite")),
    Case(
        "distill: infinite temperature",
        lambda ws, t: _run_args(ws, t, "loss.temperature=.inf"),
        ("loss.temperature", "finite"),
    ),
    Case(
        "distill: NaN temperature",
        lambda ws, t: _run_args(ws, t, "loss.temperature=nan"),
        ("loss.temperature", "finite"),
    ),
    Case("distill: boolean alpha", lambda ws, t: _run_args(ws, t, "loss.alpha=true"), ("loss.alpha", "not true/false")),
    Case(
        "distill: boolean max_steps",
        lambda ws, t: _run_args(ws, t, "train.max_steps=yes"),
        ("train.max_steps", "integer"),
    ),
    Case("distill: negative seed", lambda ws, t: _run_args(ws, t, "train.seed=-1"), ("train.seed", ">= 0")),
    Case(
        "distill: unknown key",
        lambda ws, t: _run_args(ws, t, "train.learning_rate=1"),
        ("unknown key", "learning_rate"),
    ),
    Case("distill: override without =", lambda ws, t: _run_args(ws, t, "train.lr"), ("train.lr", "key=value")),
    Case("distill: config file missing", lambda ws, t: ["distill", "-c", t / "nope.yaml"], ("nope.yaml", "not found")),
    Case(
        "distill: config key given twice",
        lambda ws, t: ["distill", "-c", t / "dup.yaml"],
        ("dup.yaml:3", "'alpha'", "twice"),
        _write("dup.yaml", "loss:\n  alpha: 0.5\n  alpha: 0.9\n"),
    ),
    Case(
        "distill: config not UTF-8",
        lambda ws, t: ["distill", "-c", t / "latin1.yaml"],
        ("latin1.yaml", "not UTF-8"),
        _write("latin1.yaml", b"loss:\n  name: fkl # caf\xe9\n"),
    ),
    Case(
        "distill: config not YAML",
        lambda ws, t: ["distill", "-c", t / "bad.yaml"],
        ("bad.yaml:", "not valid YAML"),
        _write("bad.yaml", "loss:\n  alpha: [0.5\n"),
    ),
    Case(
        "distill: config a list",
        lambda ws, t: ["distill", "-c", t / "list.yaml"],
        ("list.yaml", "mapping"),
        _write("list.yaml", "- a\n- b\n"),
    ),
    # ---- distill: models ----
    Case(
        "distill: student missing",
        lambda ws, t: _run_args(ws, t, f"model.student={t / 'nope'}"),
        ("nope", "does not exist"),
    ),
    Case(
        "distill: student without tokenizer",
        lambda ws, t: _run_args(ws, t, f"model.student={ws / 'no-tokenizer'}"),
        ("no-tokenizer", "no tokenizer"),
    ),
    Case(
        "distill: truncated student weights",
        lambda ws, t: _run_args(ws, t, f"model.student={ws / 'truncated'}"),
        ("truncated", "model.safetensors"),
    ),
    Case(
        "distill: teacher embedding smaller than its tokenizer",
        lambda ws, t: _run_args(ws, t, f"model.teacher={ws / 'small-embedding'}"),
        ("small-embedding", "embedding", "tokenizer"),
    ),
    Case(
        "distill: teacher not a model directory",
        lambda ws, t: _run_args(ws, t, f"model.teacher={ws / 'not-model'}"),
        ("not-model", "not a model directory"),
    ),
    Case(
        "distill: config.json not JSON",
        lambda ws, t: _run_args(ws, t, f"model.teacher={ws / 'bad-config'}"),
        ("bad-config", "config.json"),
    ),
    # ---- distill: data and output ----
    Case(
        "distill: data file missing",
        lambda ws, t: _run_args(ws, t, f"data.train=[{t / 'none.jsonl'}]"),
        ("none.jsonl", "does not exist"),
    ),
    Case(
        "distill: data not JSON",
        lambda ws, t: _run_args(ws, t, f"data.train=[{t / 'd.jsonl'}]"),
        ("d.jsonl:2", "not valid JSON"),
        _write("d.jsonl", '{"text": "a"}\n{"text": \n'),
    ),
    Case(
        "distill: data not UTF-8",
        lambda ws, t: _run_args(ws, t, f"data.train=[{t / 'd.jsonl'}]"),
        ("d.jsonl:1", "UTF-8"),
        _write("d.jsonl", NOT_UTF8),
    ),
    Case(
        "distill: data a directory",
        lambda ws, t: _run_args(ws, t, f"data.train=[{t / 'sub'}]"),
        ("sub", "directory"),
        _write("sub/x.jsonl", '{"text": "a"}\n'),
    ),
    Case(
        "distill: data record without text",
        lambda ws, t: _run_args(ws, t, f"data.train=[{t / 'd.jsonl'}]"),
        ("d.jsonl:1", '"text"'),
        _write("d.jsonl", '{"body": "a"}\n'),
    ),
    Case(
        "distill: output dir holds a user's files",
        lambda ws, t: _run_args(ws, t),
        ("run", "--overwrite"),
        _write("run/notes.txt", "mine"),
    ),
    Case(
        "distill: output dir is a file",
        lambda ws, t: _run_args(ws, t),
        ("run", "not a directory"),
        _write("run", "mine"),
    ),
    # ---- cache build / verify / info ----
    Case(
        "cache build: NaN temperature", lambda ws, t: _build(ws, t, "--temperature", "nan"), ("--temperature", "finite")
    ),
    Case(
        "cache build: infinite temperature",
        lambda ws, t: _build(ws, t, "--temperature", "inf"),
        ("--temperature", "finite"),
    ),
    Case("cache build: k = 0", lambda ws, t: _build(ws, t, "--k", "0"), ("--k", ">= 1")),
    Case(
        "cache build: teacher without tokenizer",
        lambda ws, t: _build(ws, t, "--teacher", ws / "no-tokenizer"),
        ("no-tokenizer", "no tokenizer"),
    ),
    Case(
        "cache build: data not UTF-8",
        lambda ws, t: _build(ws, t, "--data", t / "d.jsonl"),
        ("d.jsonl:1", "UTF-8"),
        _write("d.jsonl", NOT_UTF8),
    ),
    Case(
        "cache build: out is a user's directory",
        lambda ws, t: _build(ws, t),
        ("cache", "not a teacher cache"),
        _write("cache/notes.txt", "mine"),
    ),
    Case(
        "cache build: other settings without --overwrite",
        lambda ws, t: _build(ws, t, "--k", "8"),
        ("cache", "other settings", "--overwrite"),
        _copy_cache_and(lambda ws, t: None),
    ),
    Case("cache verify: not a directory", lambda ws, t: ["cache", "verify", t / "nope"], ("nope", "no such")),
    Case(
        "cache verify: no manifest",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("cache", "no manifest.json"),
        _write("cache/shard-00000.bin", b"x"),
    ),
    Case(
        "cache verify: temperature edited by hand",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("manifest.json", "checksum mismatch"),
        _edit_manifest(lambda m: m.update(temperature=3.0)),
    ),
    Case(
        "cache verify: a shard without its file name",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("manifest.json", "checksum mismatch"),
        _edit_manifest(lambda m: m["shards"][0].pop("file")),
    ),
    Case(
        "cache verify: manifest not JSON",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("manifest.json", "unreadable"),
        _copy_cache_and(_write("cache/manifest.json", "{")),
    ),
    Case(
        "cache verify: truncated shard",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("shard-00000.bin", "truncated"),
        _edit_shard(lambda b: b[: len(b) // 2]),
    ),
    Case(
        "cache verify: bit-flipped shard",
        lambda ws, t: ["cache", "verify", t / "cache"],
        ("shard-00000.bin", "checksum mismatch"),
        _edit_shard(_flip),
    ),
    Case(
        "cache info: temperature edited by hand",
        lambda ws, t: ["cache", "info", t / "cache"],
        ("manifest.json", "checksum mismatch"),
        _edit_manifest(lambda m: m.update(temperature=3.0)),
    ),
    Case(
        "distill: cache with an edited manifest",
        lambda ws, t: _run_args(ws, t, "teacher.source=cache", f"teacher.cache={t / 'cache'}", "loss.temperature=3"),
        ("manifest.json", "checksum mismatch"),
        _edit_manifest(lambda m: m.update(temperature=3.0)),
    ),
    # ---- student init ----
    Case(
        "student init: truncated teacher weights",
        lambda ws, t: _init(ws, t, "--teacher", ws / "truncated"),
        ("truncated", "model.safetensors"),
    ),
    Case(
        "student init: teacher not a model directory",
        lambda ws, t: _init(ws, t, "--teacher", ws / "not-model"),
        ("not-model", "not a model directory"),
    ),
    Case("student init: layers = 0", lambda ws, t: _init(ws, t, "--layers", "0"), ("--layers", ">= 1")),
    Case(
        "student init: out holds a user's files",
        lambda ws, t: _init(ws, t),
        ("new-student", "--overwrite"),
        _write("new-student/notes.txt", "mine"),
    ),
    # ---- eval ----
    Case(
        "eval: model without tokenizer",
        lambda ws, t: _eval(ws, t, "--model", ws / "no-tokenizer"),
        ("no-tokenizer", "no tokenizer"),
    ),
    Case(
        "eval: model embedding smaller than its tokenizer",
        lambda ws, t: _eval(ws, t, "--model", ws / "small-embedding"),
        ("small-embedding", "embedding"),
    ),
    Case(
        "eval: data not JSON",
        lambda ws, t: _eval(ws, t, "--data", t / "d.jsonl"),
        ("d.jsonl:1", "not valid JSON"),
        _write("d.jsonl", "text\n"),
    ),
    Case(
        "eval: boolean seq_len",
        lambda ws, t: ["eval", "seq_len=true", "--model", ws / "student", "--data", ws / "train.jsonl", "--out", t],
        ("seq_len", "integer"),
    ),
    # ---- generate ----
    Case(
        "generate: existing unrelated output",
        lambda ws, t: _generate(ws, t),
        ("gen.jsonl:1", "not a potstill"),
        _write("gen.jsonl", UNRELATED),
    ),
    Case(
        "generate: unrelated output, one line without newline",
        lambda ws, t: _generate(ws, t),
        ("gen.jsonl:1", "not a potstill"),
        _write("gen.jsonl", b'{"id": 1}'),
    ),
    Case(
        "generate: inputs not UTF-8",
        lambda ws, t: _generate(ws, t, f"inputs={t / 'in.jsonl'}"),
        ("in.jsonl:1", "UTF-8"),
        _write("in.jsonl", NOT_UTF8),
    ),
    Case(
        "generate: template not UTF-8",
        lambda ws, t: _generate(ws, t, f"template={t / 'tpl.txt'}"),
        ("tpl.txt", "not UTF-8"),
        _write("tpl.txt", b"Continue: {text} caf\xe9"),
    ),
    Case(
        "generate: template missing",
        lambda ws, t: _generate(ws, t, f"template={t / 'tpl.txt'}"),
        ("tpl.txt", "not found"),
    ),
    Case(
        "generate: teacher without tokenizer",
        lambda ws, t: _generate(ws, t, f"teacher.model={ws / 'no-tokenizer'}"),
        ("no-tokenizer", "no tokenizer"),
    ),
    Case(
        "generate: NaN sampling temperature",
        lambda ws, t: _generate(ws, t, "sampling.temperature=nan"),
        ("sampling.temperature", "finite"),
    ),
    # ---- plan, report, teacher prepare ----
    Case(
        "plan: infinite learning rate",
        lambda ws, t: ["plan", *_run_args(ws, t, "train.lr=.inf")[1:]],
        ("train.lr", "finite"),
    ),
    Case(
        "plan: student missing",
        lambda ws, t: ["plan", "--no-probe", *_run_args(ws, t, f"model.student={t / 'x'}")[1:]],
        ("x", "model.student"),
    ),
    Case("report: not a run directory", lambda ws, t: ["report", t], ("mixing.jsonl", "not found")),
    Case(
        "teacher prepare: GGUF missing",
        lambda ws, t: ["teacher", "prepare", "--gguf", t / "m.gguf", "--no-check"],
        ("m.gguf", "does not exist"),
    ),
    Case(
        "teacher prepare: not a GGUF",
        lambda ws, t: ["teacher", "prepare", "--gguf", t / "m.gguf", "--no-check"],
        ("m.gguf", "not a valid GGUF"),
        _write("m.gguf", b"GGUF" + b"\x00" * 12),
    ),
    # ---- on-policy options ----
    Case(
        "on-policy: lambda above 1", lambda ws, t: _on_policy(ws, t, "on_policy.lmbda=1.5"), ("on_policy.lmbda", "<= 1")
    ),
    Case(
        "on-policy: lambda below 0",
        lambda ws, t: _on_policy(ws, t, "on_policy.lmbda=-0.1"),
        ("on_policy.lmbda", ">= 0"),
    ),
    Case(
        "on-policy: max_new_tokens = 0",
        lambda ws, t: _on_policy(ws, t, "on_policy.max_new_tokens=0"),
        ("on_policy.max_new_tokens", "> 0"),
    ),
    Case(
        "on-policy: a teacher cache asked for",
        lambda ws, t: _on_policy(ws, t, "teacher.source=cache", f"teacher.cache={ws / 'cache'}"),
        ("teacher.source", "cannot score the student's new samples"),
    ),
    # ---- corruption found by the readers ----
    Case(
        "cache verify: bit-flipped speech teacher targets",
        lambda ws, t: ["cache", "verify", t / "speech-targets"],
        ("targets.safetensors", "altered"),
        _copy_tree_and_flip("speech-targets", "targets.safetensors"),
    ),
    Case(
        "cache info: edited speech teacher targets manifest",
        lambda ws, t: ["cache", "info", t / "speech-targets"],
        ("manifest.json", "checksum mismatch"),
        _copy_tree_and_flip("speech-targets", "manifest.json"),
    ),
    Case(
        "cache verify: bit-flipped cross-tokenizer cache shard",
        lambda ws, t: ["cache", "verify", t / "xtok-cache"],
        ("shard-00000.bin", "checksum mismatch"),
        _copy_tree_and_flip("xtok-cache", "shard-00000.bin"),
    ),
    Case(
        "generate: bit-flipped earlier output",
        lambda ws, t: _generate(ws, t),
        ("gen.jsonl:2", "not a potstill"),
        _write("gen.jsonl", FLIPPED_RECORDS),
    ),
    # ---- export, serve, check, bench ----
    Case("export: unknown format", lambda ws, t: _export(ws, t, "--format", "tflite"), ("--format", "tflite")),
    Case(
        "export: unknown quantization",
        lambda ws, t: _export(ws, t, "--format", "gguf", "--quant", "q3_k"),
        ("--quant", "q3_k"),
    ),
    Case("export: NaN max error", lambda ws, t: _export(ws, t, "--max-error", "nan"), ("--max-error", "nan")),
    Case(
        "export: output exists",
        lambda ws, t: _export(ws, t),
        ("student.onnx", "--overwrite"),
        _write("student.onnx", "x"),
    ),
    Case(
        "export: model missing",
        lambda ws, t: _export(ws, t)[:1] + [t / "nope"] + _export(ws, t)[2:],
        ("nope", "not a model directory"),
    ),  # fmt: skip
    Case("serve: model missing", lambda ws, t: ["serve", t / "nope"], ("nope", "does not exist")),
    Case("serve: unknown dtype", lambda ws, t: ["serve", ws / "student", "--dtype", "int3"], ("--dtype", "int3")),
    Case(
        "serve: API key variable unset",
        lambda ws, t: ["serve", ws / "student", "--api-key-env", "POTSTILL_NO_SUCH_KEY"],
        ("--api-key-env", "POTSTILL_NO_SUCH_KEY", "not set"),
    ),
    Case("check: student missing", lambda ws, t: ["check", ws / "teacher", t / "nope"], ("nope", "does not exist")),
    Case(
        "check: data not JSON",
        lambda ws, t: ["check", ws / "teacher", ws / "student", "--data", t / "d.jsonl"],
        ("d.jsonl:1", "not valid JSON"),
        _write("d.jsonl", "text\n"),
    ),
    Case("bench: unknown dtype", lambda ws, t: ["bench", ws / "student", "--dtype", "int3"], ("--dtype", "int3")),
    Case("bench: model missing", lambda ws, t: ["bench", t / "nope"], ("nope", "no such model")),
    # ---- teacher select ----
    Case(
        "teacher select: candidate missing",
        lambda ws, t: _select(ws, t, "--candidates", t / "nope"),
        ("nope", "no such model directory"),
    ),
    Case(
        "teacher select: out is a file",
        lambda ws, t: _select(ws, t),
        ("select", "not a directory"),
        _write("select", "mine"),
    ),
    Case(
        "teacher select: infinite learning rate",
        lambda ws, t: _select(ws, t, "train.lr=.inf"),
        ("train.lr", "finite"),
    ),
    # ---- speech commands (all refused before any model or synthesizer runs) ----
    Case(
        "speech recipe: NaN temperature",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--temperature", "nan"],
        ("--temperature", "finite"),
    ),
    Case(
        "speech recipe: alpha above 1",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--alpha", "2"],
        ("--alpha must be <= 1", "(got 2.0)"),
    ),
    Case("speech recipe: k = 0", lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--k", "0"], ("--k", ">= 1")),
    Case(
        "speech recipe: unknown loss",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--loss", "kl"],
        ("--loss", "one of"),
    ),
    Case(
        "speech recipe: layers not integers",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--encoder-layers", "a,b"],
        ("--encoder-layers must be an integer", "(got 'a')"),
    ),
    Case(
        "speech recipe: no seeds",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--seeds", ","],
        ("--seeds", "at least 1"),
    ),
    Case(
        "speech recipe: negative epochs",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--epochs", "-3"],
        ("--epochs must be >= 1", "(got -3)"),
    ),
    Case(
        "speech recipe: NaN learning rate",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp", "--lr", "nan"],
        ("--lr must be a finite number",),
    ),
    Case(
        "speech recipe: out is a file",
        lambda ws, t: ["speech", "recipe", "--out", t / "sp"],
        ("sp", "not a directory"),
        _write("sp", "mine"),
    ),
    Case(
        "speech eval: data missing",
        lambda ws, t: ["speech", "eval", ws / "student", "--data", t / "nope.jsonl"],
        ("nope.jsonl", "cannot read"),
    ),
    Case(
        "speech eval: record without audio",
        lambda ws, t: ["speech", "eval", ws / "student", "--data", ws / "train.jsonl"],
        ("train.jsonl:1", "'audio'"),
    ),
    Case(
        "speech transcribe: not audio",
        lambda ws, t: ["speech", "transcribe", ws / "student", t / "a.wav"],
        ("a.wav", "does not decode"),
        _write("a.wav", "not a sound"),
    ),
    # ---- demo ----
    Case(
        "demo: settings file missing",
        lambda ws, t: ["demo", "--quick", "--out", t / "demo", "--settings", t / "nope.yaml"],
        ("nope.yaml", "not found"),
    ),
    Case(
        "demo: settings file not a mapping",
        lambda ws, t: ["demo", "--quick", "--out", t / "demo", "--settings", t / "list.yaml"],
        ("list.yaml", "mapping"),
        _write("list.yaml", "- a\n"),
    ),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer, build_model) -> Path:
    """Tiny student and teacher, broken model directories, data, generate inputs, a small teacher cache, a
    cross-tokenizer cache and speech teacher targets."""
    import torch

    from potstill.data.audio import AudioRecord
    from potstill.losses.sparse import topk_targets
    from potstill.teacher.cache import build_cache
    from potstill.teacher.speech import SpeechTargets, save_speech_targets
    from xtok_tokenizers import byte_level_bpe

    root = tmp_path_factory.mktemp("ws")
    build_model(tiny_tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=64, save_to=root / "teacher")
    build_model(
        tiny_tokenizer, 2, vocab_size=len(tiny_tokenizer) - 20, max_positions=64, save_to=root / "small-embedding"
    )
    shutil.copytree(root / "student", root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "no-tokenizer" / name).unlink()
    shutil.copytree(root / "student", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "student", root / "bad-config")
    (root / "bad-config" / "config.json").write_text("{")
    (root / "not-model").mkdir()
    (root / "not-model" / "notes.txt").write_text("mine")
    words = "the cat sat on a mat with some dog and bird".split()
    rows = [{"text": " ".join(words[i % 5 :] + words[: i % 5])} for i in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rows.jsonl").write_text("".join(json.dumps({"prompt": r["text"]}) + "\n" for r in rows[:2]))
    build_cache(root / "teacher", [root / "train.jsonl"], root / "cache", k=4, seq_len=16, progress=False)
    prompts = [{"prompt": r["text"][:12], "completion": r["text"][12:]} for r in rows]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    # a cross-tokenizer cache (a student of another tokenizer family) and speech teacher targets
    build_model(byte_level_bpe(), 0, hidden=32, max_positions=64, save_to=root / "xtok-student")
    build_cache(root / "teacher", [root / "train.jsonl"], root / "xtok-cache", k=4, seq_len=16,
                student=root / "xtok-student", progress=False)  # fmt: skip
    records = [AudioRecord(str(root / f"{i}.wav"), f"text {i}", "synthetic") for i in range(2)]
    targets = [topk_targets(torch.randn(n + 1, 50), 4, 2.0) for n in (2, 3)]
    speech = SpeechTargets(records, [[4, 5], [6, 7, 8]], targets, [0.0, 0.5], 0, {"k": 4, "temperature": 2.0})
    save_speech_targets(speech, root / "speech-targets")
    return root


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots -> sha256 of its bytes (directories as entries of their own)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, ws, tmp_path, monkeypatch, run_main, assert_one_line_error):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path.parent / f"{tmp_path.name}-potstill-cache"))
    work = tmp_path / "w"
    work.mkdir()
    if case.setup is not None:
        case.setup(ws, work)
    before = _snapshot(ws, work)
    proc = run_main(*case.argv(ws, work))
    line = assert_one_line_error(proc, *case.needles)
    assert proc.returncode == 2 and line.startswith("potstill: error: ")
    assert _snapshot(ws, work) == before, "a bad input changed, added or removed files"


def test_catalog_is_at_least_forty_distinct_inputs():
    assert len({c.name for c in CASES}) == len(CASES) >= 40


def test_docs_list_every_case():
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.name for c in CASES if f"| {c.name} |" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"


# ---- outputs that cannot be written: a read-only file system, a full disk ----


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only: the test skips where mounting is not allowed)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path]).returncode:
        pytest.skip("needs root and mount to make a read-only or full file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def readonly(tmp_path):
    """A directory nothing can be written to: chmod 555 for a plain user, a read-only tmpfs for root."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with _tmpfs(path, "ro,size=64k") as mounted:
        yield mounted


READONLY = {
    "distill": lambda ws, out: _run_args(ws, out.parent, f"train.output_dir={out}"),
    "eval": lambda ws, out: _eval(ws, out.parent, "--out", out),
    "student init": lambda ws, out: _init(ws, out.parent, "--out", out),
    "generate": lambda ws, out: _generate(ws, out.parent, f"output={out / 'gen.jsonl'}"),
    "cache build": lambda ws, out: _build(ws, out.parent, "--out", out),
}


@pytest.mark.parametrize("command", list(READONLY))
def test_read_only_output_is_one_line(command, ws, readonly, run_main, assert_one_line_error):
    proc = run_main(*READONLY[command](ws, readonly / "out"))
    assert_one_line_error(proc, str(readonly / "out"), "choose an output you can write to")
    assert list(readonly.iterdir()) == []


def test_full_disk_cache_build_is_one_line_leaves_nothing_half_written_and_resumes(ws, tmp_path, monkeypatch, run_main):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "potstill-cache"))
    with _tmpfs(tmp_path / "small", "size=64k") as disk:
        filler = disk / "filler"
        with open(filler, "wb") as fh:  # leave ~4 KiB: build.json fits, a shard does not
            fh.write(b"\0" * (64 * 1024 - 4096))
        out = disk / "cache"
        proc = run_main(*_build(ws, tmp_path, "--out", out, "--shard-tokens", "64"))
        last = proc.stderr.strip().splitlines()[-1]  # after the progress bar of the shards written before
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert last.startswith("potstill: error: ") and "shard-" in last and "out of disk space" in last, last
        left = sorted(p.name for p in out.iterdir())
        assert "manifest.json" not in left and not [n for n in left if n.startswith(".")], left
        whole = {n for n in left if n.startswith("shard-")}
        filler.unlink()
        assert run_main(*_build(ws, tmp_path, "--out", out, "--shard-tokens", "64")).returncode == 0
        assert whole <= {p.name for p in out.glob("shard-*.bin")}
        assert run_main("cache", "verify", out).returncode == 0


def test_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_resumes(ws, tmp_path, run_main):
    with _tmpfs(tmp_path / "small", "size=4m") as disk:
        filler = disk / "filler"
        with open(filler, "wb") as fh:  # leave ~320 KiB: config.yaml fits, a checkpoint with its optimizer does not
            fh.write(b"\0" * (4096 * 1024 - 320 * 1024))
        out = disk / "run"
        args = [*_run_args(ws, tmp_path, f"train.output_dir={out}", "train.max_steps=4", "train.save_steps=2")]
        proc = run_main(*args)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert (
            last == f"potstill: error: {out}: out of disk space; free some and rerun the same command (finished"
            " work is kept)"
        )
        filler.unlink()
        assert run_main(*args).returncode == 0
        assert (out / "student" / "model.safetensors").is_file() and (out / "summary.json").is_file()
