"""`potstill vision ...`: the three vision recipes from a YAML file of recipe fields and / or options.

Each command validates its recipe (`load_recipe`: the --config file, then the options given, through `potstill.config`
like every config: a bad value is a one-line error naming the option or the key), scans the images (undecodable ones
skipped and counted, or refused with --on-bad error), runs its recipe into --out (report.json, report.md, grid.png)
and prints report.md. Heavy imports happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from potstill.errors import UserError

vision_app = typer.Typer(
    help="Vision recipes: classifier soft labels, a text teacher for images, captioning / VQA (docs/vision.md).",
    no_args_is_help=True,
)
_PRINT_CONFIG = typer.Option(False, "--print-config", help="Print the resolved recipe as YAML and exit.")


def _config(what: str):
    return typer.Option(None, "--config", "-c", help=f"YAML file of {what} (options override it).")


def load_recipe(cls: type, config: Path | None, given: dict[str, Any]) -> Any:
    """The recipe `cls` (a `config.base.Section`) from the YAML file `config` (optional; a flat mapping of its
    fields) overridden by the options `given` (field -> value; None: the option was not given).

    Raises:
        UserError: an unreadable file, an unknown field, a value of the wrong type or out of bounds (one line).
    """
    from potstill.config.load import load_config

    return load_config(config, model=cls, flags={k: v for k, v in given.items() if v is not None})


def _starts(recipe, print_config: bool) -> bool:
    """Print the resolved recipe (and stop: False) or let the run start (True)."""
    from potstill.config.base import dump_config

    if print_config:
        typer.echo(dump_config(recipe).rstrip("\n"))
    return not print_config


def _vision_images(sources: list[Path], per_domain: int | None, on_bad: str, seed: int):
    from potstill.data.images import scan_images

    images = scan_images(sources, per_domain=per_domain, on_bad=on_bad, seed=seed)
    typer.echo(images.summary(), err=True)
    return images


_SOURCES_HELP = "Image folders (a sub-folder is a domain) and / or .jsonl files of {image, domain} records."


@vision_app.command("classify")
def vision_classify_cmd(
    sources: list[Path] = typer.Argument(..., help=_SOURCES_HELP),
    out: Path = typer.Option(..., "--out", help="Run directory (the teacher cache and features are reused there)."),
    config: Path | None = _config("fields of ClassifyRecipe"),
    per_domain: int | None = typer.Option(None, "--per-domain", help="At most this many images per domain."),
    on_bad: str = typer.Option("skip", "--on-bad", help="Images that do not decode: skip (counted) or error."),
    cut: int = typer.Option(16, "--cut", help="Lite0 MBConv blocks frozen (16: only the head conv and fc train)."),
    class_map: Path | None = typer.Option(None, "--class-map", help="JSON list: ImageNet id of each student class."),
    steps: int | None = typer.Option(None, "--steps"),
    seeds: str | None = typer.Option(None, "--seeds", help="Training seeds, a,b,..."),
    alpha: float | None = typer.Option(None, "--alpha", help="KD weight of the kd arm."),
    lr: float | None = typer.Option(None, "--lr"),
    print_config: bool = _PRINT_CONFIG,
) -> None:
    """EfficientNet-Lite2 soft labels on unlabeled images -> Lite0, vs hard labels only (report in OUT)."""
    from potstill.vision.classify import ClassifyRecipe, lite_pair, markdown, run_classify

    recipe = load_recipe(ClassifyRecipe, config, {"steps": steps, "seeds": seeds, "alpha": alpha, "lr": lr})
    mapping = _class_map(class_map) if class_map else None
    if _starts(recipe, print_config):
        images = _vision_images(sources, per_domain, on_bad, recipe.split_seed)
        pair = lite_pair(cut, mapping)
        typer.echo(markdown(run_classify(out, images, recipe, pair, f"lite0-{cut}", mapping)), nl=False)


def _class_map(path: Path) -> list[int]:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--class-map {path}: not a readable JSON file ({err})") from None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"--class-map {path}: expected a JSON list of teacher class ids (integers)")
    return value


@vision_app.command("crossmodal")
def vision_crossmodal_cmd(
    sources: list[Path] = typer.Argument(..., help=_SOURCES_HELP + " Captions come from the paths."),
    out: Path = typer.Option(..., "--out", help="Run directory (the text teacher and features are kept there)."),
    config: Path | None = _config("fields of CrossmodalRecipe"),
    per_domain: int | None = typer.Option(None, "--per-domain", help="At most this many images per domain."),
    on_bad: str = typer.Option("skip", "--on-bad", help="Images that do not decode: skip (counted) or error."),
    steps: int | None = typer.Option(None, "--steps"),
    seeds: str | None = typer.Option(None, "--seeds", help="Training seeds, a,b,..."),
    arms: str | None = typer.Option(None, "--arms", help="Of cosine,mse,contrastive,labels."),
    print_config: bool = _PRINT_CONFIG,
) -> None:
    """all-MiniLM-L6-v2 (text) teaches an image encoder to place images where their captions are (report in OUT)."""
    from potstill.data.captions import path_caption
    from potstill.vision.crossmodal import CrossmodalRecipe, markdown, run_crossmodal

    recipe = load_recipe(CrossmodalRecipe, config, {"steps": steps, "seeds": seeds, "arms": arms})
    if _starts(recipe, print_config):
        images = _vision_images(sources, per_domain, on_bad, recipe.split_seed)
        roots = [s if s.is_dir() else s.parent for s in sources]
        root = lambda p: next(r for r in roots if p.resolve().is_relative_to(r.resolve()))  # noqa: E731
        captions = [path_caption(r.path.resolve(), root(r.path).resolve()) for r in images.records]
        typer.echo(markdown(run_crossmodal(out, images, captions, recipe)), nl=False)


@vision_app.command("caption")
def vision_caption_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory (the trained teacher is saved and reused there)."),
    config: Path | None = _config("fields of CaptionRecipe"),
    labeled: int | None = typer.Option(None, "--labeled", help="Labeled scenes the students train on."),
    transfer: int | None = typer.Option(None, "--transfer", help="Unlabeled scenes answered by the teacher."),
    steps: int | None = typer.Option(None, "--steps", help="Every student's optimizer steps."),
    seeds: str | None = typer.Option(None, "--seeds", help="Training seeds, a,b,..."),
    arms: str | None = typer.Option(None, "--arms", help="Of ce,pseudo,kd,kd_labeled."),
    teacher_file: Path | None = typer.Option(None, "--teacher-file", help="A saved teacher state dict to reuse."),
    student_tokenizer: Path | None = typer.Option(
        None, "--student-tokenizer", help="tokenizer.json of the student: refused unless it is the teacher's."
    ),
    print_config: bool = _PRINT_CONFIG,
) -> None:
    """A captioning / VQA teacher trained on synthetic scenes, distilled through a transfer set (report in OUT)."""
    from potstill.vision.caption import CaptionRecipe, markdown, run_caption

    given = {"labeled": labeled, "transfer": transfer, "steps": steps, "seeds": seeds, "arms": arms}
    recipe = load_recipe(CaptionRecipe, config, given | {"teacher_file": str(teacher_file) if teacher_file else None})
    vocab = None
    if student_tokenizer is not None:
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(student_tokenizer)).get_vocab()
        except Exception as err:  # tokenizers raises its own Exception type for any unreadable file
            raise UserError(f"--student-tokenizer {student_tokenizer}: not a tokenizer.json ({err})") from None
    if _starts(recipe, print_config):
        typer.echo(markdown(run_caption(out, recipe, student_vocab=vocab)), nl=False)
