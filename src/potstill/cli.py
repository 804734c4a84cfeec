"""The `potstill` command line: a thin Typer layer; each command parses options, then calls one API function.

Heavy imports (torch, transformers) happen inside the commands so `--help` stays instant. Every
`UserError` raised below is printed as one line on stderr with exit status 2 (see `main`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from potstill import __version__
from potstill.errors import UserError

app = typer.Typer(
    name="potstill",
    help="Knowledge distillation of language models: a large teacher teaches a small, fast student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teacher_app = typer.Typer(help="Prepare teacher models (GGUF -> cached HF directory).", no_args_is_help=True)
student_app = typer.Typer(help="Create students (pruned from a teacher, trimmed vocabulary).", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(student_app, name="student")


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
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. loss.alpha=0.9 train.max_steps=50"),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Train a student against a teacher (online) with the KD objective alpha*T^2*D + (1-alpha)*CE."""
    from potstill.config import dump_config, load_config

    cfg = load_config(config, overrides or [])
    if overwrite:
        cfg.train.overwrite = True
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    from potstill.train.trainer import run_distill

    out = run_distill(cfg)
    typer.echo(f"done: {out}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="HF directory of the model to evaluate."),
    data: list[Path] = typer.Option(..., "--data", help="JSONL file(s) with text (and optional domain)."),
    out: Path = typer.Option(..., "--out", help="Output directory; eval.json is written there."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher HF directory: adds agreement and KL."),
    seq_len: int = typer.Option(256, "--seq-len", min=8, help="Tokens per packed sequence."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing eval.json."),
) -> None:
    """Perplexity, bits per byte (and teacher agreement / KL) per domain -> OUT/eval.json."""
    from potstill.eval.metrics import evaluate_cli

    path = evaluate_cli(
        model=model, data=data, out=out, teacher=teacher, seq_len=seq_len, batch_size=batch_size, overwrite=overwrite
    )
    typer.echo(f"wrote {path}")


@app.command("losses")
def losses_cmd() -> None:
    """List the divergences in the loss registry with their formulas."""
    from potstill.losses import LOSSES

    width = max(len(n) for n in LOSSES)
    for name, spec in LOSSES.items():
        typer.echo(f"{name:<{width}}  {spec.formula}")


@teacher_app.command("prepare")
def teacher_prepare_cmd(
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="A GGUF file (default: Gemma 3 270M from PyPI)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Generate a few tokens to check the model."),
) -> None:
    """Convert a GGUF teacher once into a cached HF directory (keyed by the file's hash); print its path."""
    from potstill.teacher.load import prepare_teacher

    path = prepare_teacher(gguf, check=check)
    typer.echo(str(path))


@student_app.command("init")
def student_init_cmd(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher HF directory."),
    layers: int = typer.Option(..., "--layers", help="Number of decoder layers the student keeps."),
    out: Path = typer.Option(..., "--out", help="Output HF directory for the student."),
    corpus: list[Path] = typer.Option([], "--corpus", help="JSONL text: calibration data and the vocabulary to keep."),
    trim_vocab: bool = typer.Option(True, "--trim-vocab/--no-trim-vocab", help="Keep only tokens the corpus uses."),
    select: str = typer.Option(
        "measured", "--select", help="Layers: 'measured' on the corpus, or 'even' (evenly spaced; needs no corpus)."
    ),
    vocab_size: Optional[int] = typer.Option(
        None, "--vocab-size", min=1, help="Fill the trimmed vocabulary up to this size with the teacher's top merges."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Prune a teacher into a student: keep the most important layers, trim the vocabulary to a corpus."""
    from potstill.student.init import init_student_cli

    path = init_student_cli(
        teacher=teacher,
        layers=layers,
        out=out,
        corpus=corpus,
        trim_vocab=trim_vocab,
        overwrite=overwrite,
        selection=select,
        vocab_size=vocab_size,
    )
    typer.echo(f"wrote {path}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("potstill-demo"), "--out", help="Directory for the report and the students."),
    quick: bool = typer.Option(False, "--quick", help="A few-minute version (fewer steps and tokens)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of resuming."),
) -> None:
    """Distill the real Gemma 3 270M into a 5x smaller student on this CPU and write a report."""
    from potstill.demo import run_demo

    report = run_demo(out=out, quick=quick, overwrite=overwrite)
    typer.echo(f"report: {report}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        typer.echo(f"potstill: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("potstill: interrupted (rerun the same command to resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
