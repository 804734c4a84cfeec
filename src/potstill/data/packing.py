"""Tokenize records and pack them into fixed-length sequences with loss masks and byte counts.

Each record becomes one document: `prompt tokens + text/completion tokens + <eos>` (the tokenizer adds no
special tokens itself; `<eos>` only if the tokenizer has one). Documents are concatenated per domain, in
order of first appearance, and cut into windows of `seq_len` tokens; with `add_bos` every window is
`[<bos>] + seq_len - 1 content tokens`, so a text continues across windows with `<bos>` in between (Gemma
needs `<bos>` at the start of every sequence). Sequences never mix domains. A prompt/completion document
starts a new window when it does not fit in the current one, so it is never split; one longer than a
window is truncated (prompt from the left, then completion from the right) and counted in `truncated`.

Labels follow the HF convention (unshifted): `labels = input_ids`, with -100 on position 0 (the `<bos>`,
or without `add_bos` a token nothing predicts), on padding and on prompt tokens. `n_bytes` is the number
of UTF-8 bytes of text whose tokens are scored in the window: every text/completion token gets the bytes
of its character span (from the fast tokenizer's offset mapping), `<eos>` gets 0, so with `add_bos` the
dataset total equals the bytes of all texts and completions exactly (unless documents were truncated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from potstill.data.chat import render_chat
from potstill.data.sources import Record, read_many
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

_TOKENIZE_BATCH = 512  # records per tokenizer call: fast tokenizers work in parallel within a batch


@dataclass
class _Doc:
    """One tokenized record: ids [n], scored [n] bool (loss on it), nbytes [n] (UTF-8 bytes it covers)."""

    ids: np.ndarray
    scored: np.ndarray
    nbytes: np.ndarray
    whole: bool  # prompt/completion: keep in one window

    def __len__(self) -> int:
        return len(self.ids)

    def part(self, start: int, stop: int) -> _Doc:
        return _Doc(self.ids[start:stop], self.scored[start:stop], self.nbytes[start:stop], self.whole)


class PackedDataset(Dataset):
    """Packed sequences of one or more domains (a torch Dataset of dicts).

    Item i: `input_ids` [L] long, `attention_mask` [L] long (0 on padding), `labels` [L] long (-100 =
    no loss), `n_bytes` [] long (bytes of text scored in the sequence), `domain` str.

    Attributes:
        input_ids, attention_mask, labels: [N, L] long tensors.
        n_bytes: [N] long tensor.
        domains: N domain names.
        truncated: prompt/completion records cut to fit a sequence.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        n_bytes: torch.Tensor,
        domains: list[str],
        truncated: int = 0,
    ):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.n_bytes = n_bytes
        self.domains = domains
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.domains)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "n_bytes": self.n_bytes[i],
            "domain": self.domains[i],
        }

    @property
    def domain_names(self) -> list[str]:
        """Distinct domains in order of first appearance."""
        return list(dict.fromkeys(self.domains))


def pack(
    records: list[Record], tokenizer, seq_len: int, add_bos: bool = True, drop_last: bool = False
) -> PackedDataset:
    """Tokenize and pack records into sequences of `seq_len` tokens (see the module docstring).

    Args:
        records: from `read_jsonl`.
        tokenizer: a fast (Rust-backed) HF tokenizer; its offset mapping attributes bytes to tokens.
        seq_len: tokens per sequence, including the `<bos>`.
        add_bos: start every sequence with `tokenizer.bos_token_id`.
        drop_last: drop each domain's final partial sequence instead of padding it.

    Returns:
        A PackedDataset, domains in order of first appearance, deterministic for the same inputs.

    Raises:
        UserError: a slow tokenizer, no `<bos>` while `add_bos`, seq_len too small, or nothing left to score.
    """
    bos = _check_tokenizer(tokenizer, seq_len, add_bos)
    content_len = seq_len - 1 if add_bos else seq_len
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    by_domain: dict[str, list[_Doc]] = {}
    for record, doc in zip(records, tokenize(records, tokenizer), strict=True):
        by_domain.setdefault(record.domain, []).append(doc)
    rows, domains, truncated = [], [], 0
    for domain, docs in by_domain.items():
        windows, cut = _windows(docs, content_len, drop_last)
        truncated += cut
        for window in windows:
            if window.scored[int(not add_bos) :].any():  # a window whose only token is unpredictable is useless
                rows.append(_row(window, seq_len, bos, pad))
                domains.append(domain)
    if truncated:
        log.warning("%d prompt/completion records longer than %d tokens were truncated", truncated, content_len)
    if not rows:
        raise UserError(f"no sequences to score: drop_last={drop_last} left nothing at seq_len={seq_len}")
    ids, mask, labels, nbytes = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
    return PackedDataset(ids, mask, labels, nbytes, domains, truncated)


def load_dataset(
    paths: list[str | Path], tokenizer, seq_len: int, add_bos: bool = True, drop_last: bool = False
) -> PackedDataset:
    """Read JSONL files (`read_many`) and `pack` them."""
    return pack(read_many(paths), tokenizer, seq_len, add_bos=add_bos, drop_last=drop_last)


def collate(batch: list[dict]) -> dict:
    """Stack PackedDataset items: tensors -> [B, ...], `domain` -> list of B names."""
    out = {key: torch.stack([item[key] for item in batch]) for key in batch[0] if key != "domain"}
    out["domain"] = [item["domain"] for item in batch]
    return out


def tokenize(records: list[Record], tokenizer) -> list[_Doc]:
    """Tokenize records in batches into documents: prompt + text/completion + `<eos>` (chat records rendered first,
    by `potstill.data.chat.render_chat`; a templated completion ends with its end-of-turn token instead, a `cut` one
    with neither)."""
    eos = tokenizer.eos_token_id
    records = render_chat(records, tokenizer)
    docs = []
    for start in range(0, len(records), _TOKENIZE_BATCH):
        chunk = records[start : start + _TOKENIZE_BATCH]
        contexts = tokenizer([r.context for r in chunk], add_special_tokens=False)["input_ids"]
        scored = tokenizer([r.scored for r in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for record, ctx, ids, offsets in zip(
            chunk, contexts, scored["input_ids"], scored["offset_mapping"], strict=True
        ):
            docs.append(_doc(record, ctx, ids, token_bytes(record.scored, offsets), eos))
    return docs


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes each token covers, summing exactly to the bytes of `text`.

    Token i gets the bytes between the furthest character end reached by tokens < i and by tokens <= i,
    so overlapping spans (a character split into several byte tokens) count once, gaps (whitespace a
    tokenizer trims from offsets) go to the next token, and what follows the last span to the last token.

    Args:
        text: the tokenized string.
        offsets: [n] (start, end) character spans from a fast tokenizer.

    Returns:
        [n] int64 byte counts (empty when there are no tokens).
    """
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    ends = np.array([end for _, end in offsets], dtype=np.int64)
    if not text.isascii():
        ends = _char_byte_prefix(text)[ends]
    reach = np.maximum.accumulate(ends)
    nbytes = np.diff(reach, prepend=0)
    nbytes[-1] += len(text.encode("utf-8")) - reach[-1]
    return nbytes


def _char_byte_prefix(text: str) -> np.ndarray:
    """[len(text) + 1] int64: UTF-8 byte offset of each character position."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def _doc(record: Record, ctx: list[int], ids: list[int], nbytes: np.ndarray, eos: int | None) -> _Doc:
    tail = [] if eos is None or record.templated or record.cut else [eos]
    tail_bytes = np.zeros(len(tail), dtype=np.int64)
    if not ids and tail:  # a non-empty text the tokenizer turned into nothing: keep the total exact
        tail_bytes[0] = len(record.scored.encode("utf-8"))
    return _Doc(
        ids=np.array(ctx + ids + tail, dtype=np.int64),
        scored=np.array([False] * len(ctx) + [True] * (len(ids) + len(tail))),
        nbytes=np.concatenate([np.zeros(len(ctx), dtype=np.int64), nbytes, tail_bytes]),
        whole=record.prompt is not None,
    )


def _windows(docs: list[_Doc], content_len: int, drop_last: bool) -> tuple[list[_Doc], int]:
    """Concatenate one domain's documents and cut them into windows of `content_len` tokens.

    Returns:
        (windows, number of truncated documents); only the last window may be shorter.
    """
    windows, parts, fill, truncated = [], [], 0, 0
    for doc in docs:
        if doc.whole and len(doc) > content_len:
            doc, truncated = _truncate(doc, content_len), truncated + 1
        if doc.whole and fill + len(doc) > content_len and fill:  # start a new window rather than split it
            windows.append(_concat(parts))
            parts, fill = [], 0
        start = 0
        while start < len(doc):
            take = min(content_len - fill, len(doc) - start)
            parts.append(doc.part(start, start + take))
            fill, start = fill + take, start + take
            if fill == content_len:
                windows.append(_concat(parts))
                parts, fill = [], 0
    if parts and not drop_last:
        windows.append(_concat(parts))
    return windows, truncated


def _truncate(doc: _Doc, length: int) -> _Doc:
    """Keep the end of the prompt and the start of the completion, `length` tokens in all."""
    n_prompt = int((~doc.scored).sum())
    keep_scored = min(len(doc) - n_prompt, length)
    keep_prompt = length - keep_scored
    index = np.r_[n_prompt - keep_prompt : n_prompt, n_prompt : n_prompt + keep_scored]
    return _Doc(doc.ids[index], doc.scored[index], doc.nbytes[index], doc.whole)


def _concat(parts: list[_Doc]) -> _Doc:
    return _Doc(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "scored", "nbytes")), whole=False)


def _row(window: _Doc, seq_len: int, bos: int | None, pad: int) -> tuple[np.ndarray, ...]:
    """One sequence: (input_ids [L], attention_mask [L], labels [L], n_bytes []) as int64 arrays."""
    head = 0 if bos is None else 1
    n = head + len(window)
    ids = np.full(seq_len, pad, dtype=np.int64)
    ids[head:n] = window.ids
    if bos is not None:
        ids[0] = bos
    mask = np.zeros(seq_len, dtype=np.int64)
    mask[:n] = 1
    scored = np.zeros(seq_len, dtype=bool)
    scored[head:n] = window.scored
    scored[0] = False  # nothing predicts position 0
    labels = np.where(scored, ids, IGNORE_INDEX)
    nbytes = np.zeros(seq_len, dtype=np.int64)
    nbytes[head:n] = window.nbytes
    return ids, mask, labels, np.int64(nbytes[scored].sum())


def _check_tokenizer(tokenizer, seq_len: int, add_bos: bool) -> int | None:
    """The `<bos>` id to use (None without add_bos); UserError if the tokenizer cannot be packed with."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{tokenizer.name_or_path}: packing needs a fast tokenizer (tokenizer.json) for byte offsets")
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2 (got {seq_len})")
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise UserError(f"{tokenizer.name_or_path}: the tokenizer has no <bos> token; set data.add_bos=false")
    return tokenizer.bos_token_id
