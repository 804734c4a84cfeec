"""Make a student from its teacher: keep the most important decoder layers and trim the vocabulary.

Depth: each layer's importance is the increase of the calibration loss (next-token CE on the corpus)
when that layer alone is skipped; the student keeps the `layers` most important ones in their original
order (`selection="measured"`), or, only when asked and without a corpus, evenly spaced ones ("even").

Vocabulary: the student keeps the ids the corpus's tokenization uses, the intermediate tokens the BPE
builds them from (so the trimmed BPE reproduces the teacher's tokenization of the corpus exactly), the
256 byte-fallback tokens (any other text still tokenizes) and the special tokens. Student id i is
teacher id `teacher_ids[i]` (`potstill_vocab.json`, read with `potstill.models.vocab.load_id_map`); the
embedding (and a tied head) are the teacher's rows at those ids. See docs/student.md for the rules and their
measurements. The pipeline is here; `vocab.py` trims the vocabulary, `layers.py` scores and copies the layers.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from potstill.config import LayerSelection
from potstill.errors import UserError
from potstill.fileio import atomic_path, check_writable
from potstill.models.lineage import STUDENT_FILE
from potstill.models.load import DTYPES, convert_gguf, enable_progress_log, load_model
from potstill.models.vocab import ID_MAP_FILE
from potstill.student.layers import build_student, calibration_batches, evenly_spaced, layer_scores, n_params
from potstill.student.vocab import fill_vocabulary, trim_tokenizer, vocabulary_to_keep

log = logging.getLogger(__name__)

SELECTIONS = get_args(LayerSelection)


def init_student(
    teacher_dir: str | Path,
    layers: int,
    out: str | Path,
    corpus_texts: Sequence[str],
    trim_vocab: bool = True,
    vocab_size: int | None = None,
    calib_tokens: int = 4096,
    calib_seq_len: int = 256,
    seed: int = 0,
    selection: str = "measured",
    calib_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Prune `teacher_dir` into an HF student directory `out`.

    Args:
        teacher_dir: teacher HF directory (or .gguf file).
        layers: decoder layers the student keeps (1..teacher's layers).
        out: output directory (written atomically: built beside it, then renamed).
        corpus_texts: calibration texts; also the vocabulary to keep.
        trim_vocab: keep only the corpus's vocabulary (+ bytes, specials, BPE intermediates).
        vocab_size: fill the trimmed vocabulary up to this many ids with the teacher's highest-priority merges
            (None: only what the corpus needs). See `fill_vocabulary`.
        calib_tokens: tokens of the corpus used to score layers.
        calib_seq_len: length of each calibration sequence (starts with bos).
        seed: picks which corpus windows form the calibration set.
        selection: "measured" (calibration loss when a layer is skipped) or "even" (evenly spaced, first
            and last kept; only meaningful without a corpus).
        calib_dtype: dtype of the copy of the teacher that scores the layers ("bfloat16": ~2x faster on CPUs with
            AVX512-BF16 and GPUs; the demo's layer ranking is the same). The student is built from the teacher's
            weights as loaded, whatever this is.
        overwrite: replace an existing `out`.

    Returns:
        The student directory.
    """
    out = Path(out)
    _check_request(layers, out, corpus_texts, trim_vocab, selection, overwrite, calib_dtype)
    start = time.perf_counter()
    teacher_dir = _resolve_teacher(teacher_dir, layers)
    teacher, tokenizer = load_model(teacher_dir)
    n_layers = teacher.config.num_hidden_layers
    info: dict = {"teacher": str(teacher_dir), "selection": selection, "teacher_layers": n_layers}
    keep_ids = None
    if corpus_texts:
        corpus_ids = tokenizer.backend_tokenizer.encode_batch(list(corpus_texts), add_special_tokens=False)
        corpus_ids = [enc.ids for enc in corpus_ids]
        keep_ids = vocabulary_to_keep(tokenizer, corpus_ids)
        info["corpus_tokens"] = sum(map(len, corpus_ids))
        info["corpus_distinct_ids"] = len({i for ids in corpus_ids for i in ids})
    if selection == "measured":
        batches = calibration_batches(corpus_ids, tokenizer, calib_tokens, calib_seq_len, seed)
        scorer = teacher if calib_dtype == "float32" else copy.deepcopy(teacher).to(DTYPES[calib_dtype])
        scores, base = layer_scores(scorer, batches, keep_ids)
        del scorer
        kept = sorted(sorted(range(n_layers), key=lambda i: -scores[i])[:layers])
        info.update(calib_tokens=sum(b.numel() for b in batches), calib_dtype=calib_dtype)
        info.update(calib_loss=base, layer_scores=scores)
    else:
        kept = evenly_spaced(n_layers, layers)
    log.info("keeping layers %s of %d", kept, n_layers)
    student_tok, id_map = tokenizer, None
    if trim_vocab:
        student_ids = keep_ids if vocab_size is None else fill_vocabulary(tokenizer, keep_ids, vocab_size)
        student_tok, id_map = trim_tokenizer(tokenizer, student_ids, corpus_texts)
    student = build_student(teacher, kept, id_map)
    s_params, t_params = n_params(student), n_params(teacher)
    info.update(kept_layers=kept, vocab_size=student.config.vocab_size, teacher_vocab_size=teacher.config.vocab_size)
    info.update(params=s_params, teacher_params=t_params, params_ratio=s_params / t_params)
    log.info(
        "student: %d layers, vocab %d, %.1fM params (%.3f of the teacher)",
        layers,
        info["vocab_size"],
        s_params / 1e6,
        s_params / t_params,
    )
    _save_atomically(out, student, student_tok, id_map, teacher.config.vocab_size, info)
    log.info("wrote %s (%.1f s)", out, time.perf_counter() - start)
    return out


def init_student_cli(
    teacher: str | Path,
    layers: int,
    out: str | Path,
    corpus: Sequence[str | Path],
    trim_vocab: bool = True,
    overwrite: bool = False,
    selection: str = "measured",
    vocab_size: int | None = None,
    calib_dtype: str = "float32",
    calib_tokens: int = 4096,
) -> Path:
    """`potstill student init`: read the corpus JSONL files (text, or prompt + completion) and call `init_student`.

    The arguments are the fields of `potstill.config.StudentInitConfig` (`init_student_cli(**cfg.model_dump())`
    is what the command does, after the config has checked each value); a request that cannot work (no corpus to
    measure layers or trim the vocabulary on, more layers than the teacher has) is reported under the command's
    option names, e.g. `--layers 9: the teacher has 4 decoder layers`.
    """
    from potstill.data.sources import read_many

    enable_progress_log()
    _check_request(layers, Path(out), list(corpus), trim_vocab, selection, overwrite, calib_dtype)
    texts = [rec.context + rec.scored for rec in read_many(list(corpus))] if corpus else []
    return init_student(
        teacher,
        layers,
        out,
        texts,
        trim_vocab=trim_vocab,
        vocab_size=vocab_size,
        selection=selection,
        calib_dtype=calib_dtype,
        calib_tokens=calib_tokens,
        overwrite=overwrite,
    )


# ----- checks and output -----------------------------------------------------------------------------------------


def _check_request(
    layers: int, out: Path, corpus: Sequence, trim_vocab: bool, selection: str, overwrite: bool, calib_dtype: str
) -> None:
    if selection not in SELECTIONS:
        raise UserError(f"--select {selection}: expected one of {', '.join(SELECTIONS)}")
    if calib_dtype not in DTYPES:
        raise UserError(f"--calib-dtype {calib_dtype}: expected one of {', '.join(DTYPES)}")
    if layers < 1:
        raise UserError(f"--layers {layers}: a student needs at least 1 decoder layer")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite, overwrite: true, to replace it)")
    check_writable(out)
    if not corpus and (trim_vocab or selection == "measured"):
        raise UserError(
            "--corpus: needed to measure layer importance and to trim the vocabulary "
            "(without one, pass --no-trim-vocab --select even for evenly spaced layers)"
        )
    if corpus and selection == "even":
        log.info("--select even: the corpus is used for the vocabulary only")


def _resolve_teacher(teacher_dir: str | Path, layers: int) -> Path:
    """The teacher's HF directory (a .gguf is converted); checks `layers` against its config before loading weights."""
    path = Path(teacher_dir)
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = convert_gguf(path)
    config = path / "config.json"
    if config.is_file():  # otherwise load_model reports what is wrong with the directory
        n_layers = json.loads(config.read_text()).get("num_hidden_layers")
        if isinstance(n_layers, int) and layers > n_layers:
            raise UserError(f"--layers {layers}: the teacher has {n_layers} decoder layers (expected 1..{n_layers})")
    return path


def _save_atomically(out: Path, model, tokenizer, id_map, teacher_vocab: int, info: dict) -> None:
    """Write the student into a temp dir beside `out`, then swap it in (an old `out` goes only after that)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if id_map is not None:
            vocab = {"teacher_vocab_size": teacher_vocab, "teacher_ids": id_map.tolist()}
            (tmp / ID_MAP_FILE).write_text(json.dumps(vocab) + "\n")
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2) + "\n")
