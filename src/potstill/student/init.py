"""Make a student from its teacher: keep the most important decoder layers and trim the vocabulary.

Depth: each layer's importance is the increase of the calibration loss (next-token CE on the corpus)
when that layer alone is skipped; the student keeps the `layers` most important ones in their original
order (`selection="measured"`), or, only when asked and without a corpus, evenly spaced ones ("even").

Vocabulary: the student keeps the ids the corpus's tokenization uses, the intermediate tokens the BPE
builds them from (so the trimmed BPE reproduces the teacher's tokenization of the corpus exactly), the
256 byte-fallback tokens (any other text still tokenizes) and the special tokens. Student id i is
teacher id `teacher_ids[i]` (`potstill_vocab.json`, read with `load_id_map`); the embedding (and a tied
head) are the teacher's rows at those ids. See docs/student.md for the rules and their measurements.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from potstill.errors import UserError
from potstill.models.vocab import ID_MAP_FILE
from potstill.models.load import DTYPES, convert_gguf, enable_progress_log, load_model

log = logging.getLogger(__name__)

STUDENT_FILE = "potstill_student.json"
SELECTIONS = ("measured", "even")
# Config fields holding one entry per decoder layer: subset them with the layers.
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


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
    n_params, t_params = _n_params(student), _n_params(teacher)
    info.update(kept_layers=kept, vocab_size=student.config.vocab_size, teacher_vocab_size=teacher.config.vocab_size)
    info.update(params=n_params, teacher_params=t_params, params_ratio=n_params / t_params)
    log.info(
        "student: %d layers, vocab %d, %.1fM params (%.3f of the teacher)",
        layers,
        info["vocab_size"],
        n_params / 1e6,
        n_params / t_params,
    )
    _save_atomically(out, overwrite, student, student_tok, id_map, teacher.config.vocab_size, info)
    log.info("wrote %s (%.1f s)", out, time.perf_counter() - start)
    return out


def init_student_cli(
    teacher: Path,
    layers: int,
    out: Path,
    corpus: Sequence[Path],
    trim_vocab: bool = True,
    overwrite: bool = False,
    selection: str = "measured",
    vocab_size: int | None = None,
    calib_dtype: str = "float32",
) -> Path:
    """`potstill student init`: read the corpus JSONL files (text, or prompt + completion) and call `init_student`."""
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
        overwrite=overwrite,
    )


# ----- vocabulary -----------------------------------------------------------------------------------------------


def vocabulary_to_keep(tokenizer, corpus_ids: Sequence[Sequence[int]]) -> list[int]:
    """Teacher ids the student needs: used ids + their BPE pieces + byte tokens + special tokens.

    A used token's pieces (its characters and the intermediate merge results) are found by re-running the
    BPE merges on its characters alone: merges never cross the boundary of a final token, so the merges
    applied inside it do not depend on context. Keeping them (and every merge whose parts and result are
    kept) makes the trimmed BPE apply exactly the teacher's merges on the corpus.

    Args:
        tokenizer: the teacher's fast tokenizer (BPE with byte fallback, or byte-level BPE).
        corpus_ids: the corpus tokenized by the teacher, without special tokens.

    Returns:
        Sorted teacher ids (teacher order is kept, so low special ids keep their values).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks = {_merge_pair(m): r for r, m in enumerate(spec["model"]["merges"])}
    added = {t["id"] for t in spec["added_tokens"]}
    inverse = {i: t for t, i in vocab.items()}
    used = {i for ids in corpus_ids for i in ids}
    keep = set(used)
    for i in used - added:
        keep.update(vocab[t] for t in _bpe_pieces(inverse[i], ranks) if t in vocab)
    keep.update(vocab[t] for t in _byte_tokens(spec))
    keep.update(tokenizer.all_special_ids)
    return sorted(keep)


def fill_vocabulary(tokenizer, keep_ids: Sequence[int], size: int) -> list[int]:
    """Grow `keep_ids` to `size` ids with the results of the teacher's highest-priority merges whose parts are kept.

    Merge order is the teacher BPE's priority (for SentencePiece-derived vocabularies such as Gemma's, the
    most frequent pieces first), so more unseen text tokenizes as the teacher does. Adding kept-part merges
    keeps the corpus tokenization exact (any subset of the teacher's merges containing the ones it applies).

    Returns:
        Sorted teacher ids; `keep_ids` unchanged if it already has `size` or more.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    inverse = {i: t for t, i in vocab.items()}
    keep = set(keep_ids)
    kept = {inverse[i] for i in keep if i in inverse}
    for merge in spec["model"]["merges"]:
        if len(keep) >= size:
            break
        a, b = _merge_pair(merge)
        if a in kept and b in kept and a + b in vocab and a + b not in kept:
            kept.add(a + b)
            keep.add(vocab[a + b])
    return sorted(keep)


def _byte_tokens(spec: dict) -> list[str]:
    """The 256 tokens that let any text be encoded: `<0xNN>` (byte fallback) or the byte-level alphabet."""
    from tokenizers.pre_tokenizers import ByteLevel

    model = spec["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return [f"<0x{b:02X}>" for b in range(256)]
    if model.get("type") == "BPE" and '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")):
        return ByteLevel.alphabet()
    raise UserError(
        "vocabulary trimming needs a BPE tokenizer with byte fallback or byte-level BPE; use --no-trim-vocab"
    )


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return a, b


def _bpe_pieces(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The characters of `token` and the tokens the BPE makes from them (lowest rank first, leftmost on ties)."""
    symbols = list(token)
    made = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False)) if p in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        made.append(symbols[i])
    return made


def trim_tokenizer(tokenizer, keep_ids: list[int], check_texts: Sequence[str] = ()):
    """A tokenizer over `keep_ids` only (re-indexed in teacher order), same normalizer/pre-tokenizer/decoder.

    Args:
        tokenizer: the teacher's fast tokenizer.
        keep_ids: sorted teacher ids to keep (from `vocabulary_to_keep`).
        check_texts: texts whose tokenization must equal the teacher's mapped through the id map.

    Returns:
        (PreTrainedTokenizerFast, id_map [V_student] long tensor: student id -> teacher id).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(keep_ids)}
    model = spec["model"]
    model["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    kept = model["vocab"]
    # Filtering keeps the merges' original priority order.
    model["merges"] = [m for m in model["merges"] if _merge_kept(_merge_pair(m), kept)]
    spec["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in spec["added_tokens"] if t["id"] in new_id]
    spec["post_processor"] = _remap_post_processor(spec["post_processor"], new_id)
    backend = Tokenizer.from_str(json.dumps(spec))
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str) and v in kept}
    student_tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    id_map = torch.tensor(keep_ids, dtype=torch.long)
    bad, n_docs = tokenization_mismatch(student_tok, tokenizer, id_map, check_texts)
    if bad:
        raise RuntimeError(f"trimmed tokenizer differs from the teacher's on {bad} of {n_docs} corpus documents")
    log.info("vocabulary %d -> %d ids, %d merges kept", len(tokenizer), len(keep_ids), len(model["merges"]))
    return student_tok, id_map


def _merge_kept(pair: tuple[str, str], kept: dict[str, int]) -> bool:
    a, b = pair
    return a in kept and b in kept and a + b in kept


def _remap_post_processor(proc: dict | None, new_id: dict[int, int]) -> dict | None:
    """Re-index the special-token ids a post-processor inserts (TemplateProcessing, Sequence of them)."""
    if proc is None:
        return None
    proc = copy.deepcopy(proc)
    if proc.get("type") == "Sequence":
        proc["processors"] = [_remap_post_processor(p, new_id) for p in proc["processors"]]
    for special in proc.get("special_tokens", {}).values():
        missing = [i for i in special["ids"] if i not in new_id]
        if missing:
            raise RuntimeError(f"post-processor token {special['id']!r} (id {missing}) was not kept")
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if key in proc:
            proc[key] = [proc[key][0], new_id[proc[key][1]]]
    return proc


def tokenization_mismatch(student_tok, teacher_tok, id_map: torch.Tensor, texts: Sequence[str]) -> tuple[int, int]:
    """Count texts whose student tokenization, mapped to teacher ids, differs from the teacher's.

    Returns:
        (mismatched texts, texts).
    """
    ids = id_map.tolist()
    student = student_tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    teacher = teacher_tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    bad = sum([ids[i] for i in s.ids] != t.ids for s, t in zip(student, teacher, strict=True))
    return bad, len(texts)


# ----- layers ----------------------------------------------------------------------------------------------------


def calibration_batches(
    corpus_ids: Sequence[Sequence[int]], tokenizer, n_tokens: int, seq_len: int, seed: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Windows of `seq_len` teacher ids ([bos] + text, documents joined by eos), drawn at random from the corpus.

    Returns:
        List of [B, seq_len] long tensors, about `n_tokens` tokens in all.
    """
    stream: list[int] = []
    for ids in corpus_ids:
        stream.extend(ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    body = seq_len - 1
    n_windows = len(stream) // body
    if n_windows == 0:
        raise UserError(f"corpus: {len(stream)} tokens, fewer than one calibration window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=gen)[: max(1, n_tokens // seq_len)].sort().values.tolist()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = torch.tensor([bos + stream[w * body : (w + 1) * body][: seq_len - len(bos)] for w in picks])
    return list(windows.split(batch_size))


@torch.no_grad()
def layer_scores(model: nn.Module, batches: Sequence[torch.Tensor], keep_ids: list[int] | None) -> tuple[list, float]:
    """Importance of each decoder layer: calibration CE with the layer skipped minus the full model's CE.

    The layers before the skipped one are not rerun: one full pass records each layer's input, and the run
    without layer i starts at layer i+1 from that input (half the cost of rerunning everything). The head is
    restricted to `keep_ids` (the student's vocabulary) when given: cheaper, and the loss the student trains on.
    The model may be a low-precision copy (see `init_student`'s `calib_dtype`); the CE is summed in float64.

    Returns:
        (scores [n_layers] floats, the full model's CE in nats/token).
    """
    n_layers = model.config.num_hidden_layers
    head_ids = torch.arange(model.config.vocab_size) if keep_ids is None else torch.tensor(keep_ids)
    head = model.get_output_embeddings().weight[head_ids]  # [V_keep, H], gathered once
    position = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    position[head_ids] = torch.arange(len(head_ids))
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def nll(hidden: torch.Tensor, ids: torch.Tensor) -> float:
        """Summed next-token CE (nats) of final hidden states [B, T, H]; every target is in `head_ids`."""
        logits = (hidden[:, :-1] @ head.T).float()  # [B, T-1, V_keep]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), position[ids[:, 1:]].flatten(), reduction="none")
        return float(ce.double().sum())

    totals, base, count = torch.zeros(n_layers, dtype=torch.float64), 0.0, 0
    t0 = time.perf_counter()
    for ids in batches:
        out = model.base_model(input_ids=ids, use_cache=False, output_hidden_states=True)
        base += nll(out.last_hidden_state, ids)
        count += ids[:, 1:].numel()
        for skip in range(n_layers):
            rest = list(range(skip + 1, n_layers))
            first = model.base_model.layers[rest[0]] if rest else model.base_model.norm
            with only_layers(model, rest), _input_replaced(first, out.hidden_states[skip]):
                totals[skip] += nll(model.base_model(input_ids=ids, use_cache=False).last_hidden_state, ids)
    base /= count
    scores = (totals / count - base).tolist()
    log.info("layer scores (%d tokens, %.1f s): %s", count, time.perf_counter() - t0, [round(x, 3) for x in scores])
    return scores, base


@contextmanager
def _input_replaced(module: nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    """Make `module` receive `hidden` as its hidden-states input (first positional or `hidden_states=`)."""

    def hook(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def only_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """Temporarily run `model` with only the given decoder layers (no KV cache: layer_idx is not renumbered)."""
    body, cfg = model.base_model, model.config
    saved = body.layers, cfg.num_hidden_layers, {k: getattr(cfg, k, None) for k in _PER_LAYER_KEYS}
    body.layers = nn.ModuleList(saved[0][i] for i in layers)
    _subset_config(cfg, layers)
    try:
        yield
    finally:
        body.layers, cfg.num_hidden_layers = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is not None:
                setattr(cfg, key, value)


def _subset_config(cfg, layers: Sequence[int]) -> None:
    n = cfg.num_hidden_layers
    for key in _PER_LAYER_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over 0..n_layers-1, first and last included when keep >= 2."""
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


# ----- model -----------------------------------------------------------------------------------------------------


def build_student(teacher: nn.Module, layers: Sequence[int], id_map: torch.Tensor | None) -> nn.Module:
    """A fresh model of the teacher's class with the given layers (renumbered 0..N-1) and vocabulary rows.

    Args:
        teacher: the teacher causal LM.
        layers: teacher layer indices to keep, ascending.
        id_map: [V_student] teacher ids to keep as the vocabulary, or None for the full vocabulary.

    Returns:
        The student (eval mode); tied embeddings stay tied.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    _subset_config(cfg, layers)
    if id_map is not None:
        cfg.vocab_size = len(id_map)
        _remap_token_ids(cfg, id_map)
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    target = student.state_dict()
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match:
            old = int(match.group(2))
            if old not in new_index:
                continue
            key = f"{match.group(1)}{new_index[old]}{match.group(3)}"
        if id_map is not None and key in target and value.shape != target[key].shape:
            value = value[id_map]  # embedding / untied head rows
        state[key] = value
    result = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    if [k for k in result.missing_keys if k not in tied] or result.unexpected_keys:
        raise RuntimeError(f"weight copy failed: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if id_map is not None:
        _remap_token_ids(student.generation_config, id_map)
    return student.eval()


def _remap_token_ids(cfg, id_map: torch.Tensor) -> None:
    """Rewrite `*_token_id` fields (int or list) from teacher ids to student ids; dropped ids become None."""
    new_id = {int(old): new for new, old in enumerate(id_map.tolist())}
    for key, value in list(vars(cfg).items()):
        if not key.endswith("_token_id") or value is None:
            continue
        if isinstance(value, list):
            setattr(cfg, key, [new_id[v] for v in value if v in new_id] or None)
        else:
            setattr(cfg, key, new_id.get(value))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


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
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
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


def _save_atomically(out: Path, overwrite: bool, model, tokenizer, id_map, teacher_vocab: int, info: dict) -> None:
    """Write the student into a temp dir beside `out`, then swap it in (an old `out` goes only after that)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if id_map is not None:
            vocab = {"teacher_vocab_size": teacher_vocab, "teacher_ids": id_map.tolist()}
            (tmp / ID_MAP_FILE).write_text(json.dumps(vocab) + "\n")
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists() and overwrite:
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
