"""Trimming a teacher's vocabulary for a student: the ids to keep, the trimmed BPE tokenizer, and its check.

The student keeps the ids the corpus's tokenization uses, the intermediate tokens the BPE builds them from (so
the trimmed BPE reproduces the teacher's tokenization of the corpus exactly), the 256 byte-fallback tokens (any
other text still tokenizes) and the special tokens. See docs/student.md for the rules and their measurements.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence

import torch

from potstill.errors import UserError

log = logging.getLogger(__name__)


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
    keep.update(vocab[t] for t in _byte_tokens(spec) if t in vocab)  # some byte-level BPEs lack rare bytes (SmolLM2)
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
    # An instruct teacher's chat template is text over the kept special tokens: the student writes the same turns.
    student_tok.chat_template = getattr(tokenizer, "chat_template", None)
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
