"""Export a model directory (a potstill student or any Llama / Gemma 3 HF model) to one file llama.cpp or
onnxruntime runs: GGUF (f32, f16, bf16, q8_0, q5_0/1, q4_0/1) or ONNX (f32, int8).

`export_model` writes the file under a temporary name, checks it (`potstill.export.check`: it loads back and its
logits on a probe text match the source's within the quantization's tolerance), and only then renames it to `out`;
a failed check or any error leaves no file, and an existing `out` is replaced only with `overwrite`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from potstill.errors import UserError
from potstill.export.gguf import ARCHES, GGUF_QUANTS
from potstill.export.onnx import ONNX_QUANTS
from potstill.fileio import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)

QUANTS = {"gguf": tuple(GGUF_QUANTS), "onnx": ONNX_QUANTS}  # format -> its quantizations (first: the default)
DEFAULT_QUANT = {"gguf": "f16", "onnx": "f32"}
TOKENIZER_FILES = ("tokenizer.json",)


def export_model(
    model_dir: str | Path,
    format: str,
    out: str | Path,
    quant: str | None = None,
    overwrite: bool = False,
    max_error: float | None = None,
) -> dict:
    """Export, check, and atomically write one file.

    Args:
        model_dir: HF directory with config.json, weights and a fast tokenizer (tokenizer.json).
        format: "gguf" or "onnx".
        out: the file to write.
        quant: one of `QUANTS[format]` (default `DEFAULT_QUANT[format]`).
        overwrite: replace an existing `out`.
        max_error: the largest relative logit error the check accepts (default: the quantization's documented
            tolerance, `potstill.export.check.TOLERANCES`); raise it knowingly for models that quantize worse.

    Returns:
        A report: {"file", "format", "quant", "bytes", "seconds", "check": {...}, ...writer details}.

    Raises:
        UserError: unknown format / quantization / architecture, missing model or tokenizer, existing `out`
            without `overwrite`, or a failed round-trip check (nothing is written then).
    """
    from potstill.export.check import TOLERANCES, check_gguf, check_onnx, probe_ids
    from potstill.models.load import enable_progress_log, load_model, quiet_hf_progress

    enable_progress_log()
    fmt, quant = _check_options(format, quant)
    src, out = Path(model_dir), Path(out)
    config = _read_config(src)
    _check_architecture(config, src, fmt)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output file exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    if max_error is not None and not max_error > 0:
        raise UserError(f"--max-error {max_error}: expected a number > 0")
    tolerance = TOLERANCES[quant] if max_error is None else max_error
    start = time.perf_counter()
    with quiet_hf_progress():
        model, tokenizer = load_model(src)
        remove_stale_temps(out.parent)
        with atomic_path(out) as tmp:
            log.info("writing %s %s -> %s", fmt, quant, out)
            if fmt == "gguf":
                from potstill.export.gguf import write_gguf

                details = write_gguf(model, tokenizer, tmp, quant, name=src.name)
                check = _named(out, tmp, check_gguf, model, tokenizer, tolerance)
            else:
                import torch

                from potstill.export.onnx import write_onnx

                details = write_onnx(model, tmp, quant, torch.tensor([probe_ids(tokenizer)]))
                check = _named(out, tmp, check_onnx, model, tokenizer, tolerance)
            size = tmp.stat().st_size
    seconds = time.perf_counter() - start
    log.info("wrote %s (%.1f MB) in %.1f s", out, size / 1e6, seconds)
    return {"file": str(out), "format": fmt, "quant": quant, "bytes": size, "seconds": round(seconds, 1),
            "check": check, **details}  # fmt: skip


def _named(out: Path, tmp: Path, check, *args) -> dict:
    """`check(tmp, *args)`, its error naming `out` (the file the user asked for), not the temporary name."""
    try:
        return check(tmp, *args)
    except UserError as err:
        raise UserError(str(err).replace(str(tmp), str(out))) from None


def _check_options(format: str, quant: str | None) -> tuple[str, str]:
    fmt = format.lower()
    if fmt not in QUANTS:
        raise UserError(f"--format {format!r}: expected one of {', '.join(QUANTS)}")
    quant = DEFAULT_QUANT[fmt] if quant is None else quant.lower()
    if quant not in QUANTS[fmt]:
        raise UserError(f"--quant {quant!r}: the {fmt} format has no such quantization (supported: "
                        f"{', '.join(QUANTS[fmt])})")  # fmt: skip
    return fmt, quant


def _read_config(src: Path):
    """The model's config; UserError for a missing directory, config or tokenizer."""
    from transformers import AutoConfig

    if not src.is_dir() or not (src / "config.json").is_file():
        raise UserError(f"{src}: not a model directory (expected config.json and weights from save_pretrained)")
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{src}: no tokenizer in the model directory (expected {' or '.join(TOKENIZER_FILES)}; "
                        "save it with tokenizer.save_pretrained)")  # fmt: skip
    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{src}/config.json: cannot read the model config ({str(err).splitlines()[0]})") from None


def _check_architecture(config, src: Path, fmt: str) -> None:
    from potstill.export.gguf import check_architecture

    if fmt == "gguf":
        check_architecture(config, src)
    elif config.model_type not in ARCHES:  # ONNX: only what the tests and the check cover
        raise UserError(f"{src}: ONNX export does not know architecture {config.model_type!r} "
                        f"(supported: {', '.join(sorted(ARCHES))})")  # fmt: skip
