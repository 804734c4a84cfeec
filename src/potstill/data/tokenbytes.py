"""What bytes each token id stands for, and the vocabulary two different tokenizers share.

Raw token strings of two tokenizer families are not comparable: a GPT-2-style byte-level BPE writes the space of
" the" as `Ġthe` (every byte is mapped to a printable character), a SentencePiece-style one as `▁the`, and both may
spell a rare character as byte tokens (`<0xE2>` in a byte-fallback vocabulary). `token_byte_table` undoes each
tokenizer's own spelling, read from its decoder, so every id becomes the UTF-8 bytes it writes into the text; special
tokens (`<bos>`, `<eos>`, chat markers) write no text and get None. Two ids of different tokenizers are the same
token when they write the same bytes (`shared_vocab`), and the special tokens of both correspond by role (`<bos>` is
the other's `<bos>`) or by equal strings (`special_map`).
"""

from __future__ import annotations

import json
import re
from functools import cache

import torch

from potstill.errors import UserError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


@cache
def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: printable character -> the byte it stands for.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are written as the
    characters from U+0100 on, in byte order (the GPT-2 convention that `tokenizers`' ByteLevel follows).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    chars.update({chr(256 + i): b for i, b in enumerate(others)})
    return chars


def _decoders(tokenizer) -> list[dict]:
    """The flat list of the tokenizer's decoder steps (as in its tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{tokenizer.name_or_path}: cross-tokenizer work needs a fast tokenizer (tokenizer.json) to map tokens"
            " to bytes and text to byte offsets; save the tokenizer with `tokenizers` (a fast one) and retry"
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    return [s for s in steps or [] if s]


def _spelling(tokenizer):
    """A function token string -> bytes that undoes the tokenizer's spelling of text (see the module doc)."""
    steps = _decoders(tokenizer)
    types = {s.get("type") for s in steps}
    if "ByteLevel" in types:
        chars = _byte_level_chars()
        return lambda token: bytes(chars[c] for c in token) if all(c in chars for c in token) else token.encode()
    replace = {s["replacement"]: " " for s in steps if s.get("type") == "Metaspace"}
    for s in steps:
        if s.get("type") == "Replace" and "String" in (s.get("pattern") or {}):
            replace[s["pattern"]["String"]] = s["content"]
    fallback = "ByteFallback" in types

    def spell(token: str) -> bytes:
        match = _BYTE_TOKEN.fullmatch(token) if fallback else None
        if match:
            return bytes([int(match.group(1), 16)])
        for old, new in replace.items():
            token = token.replace(old, new)
        return token.encode()

    return spell


def token_byte_table(tokenizer) -> list[bytes | None]:
    """The bytes each id of a tokenizer writes into the text, None for special tokens.

    Args:
        tokenizer: a fast HF tokenizer.

    Returns:
        [len(tokenizer)] entries: the UTF-8 bytes (b"" for a token that writes nothing), None for special tokens.

    Raises:
        UserError: a slow tokenizer (no tokenizer.json: neither its spelling nor byte offsets are known).
    """
    spell = _spelling(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table: list[bytes | None] = []
    for i, token in enumerate(tokens):
        if i in special_ids or token is None:
            table.append(None)
        elif i in added:  # an added (non-special) token is stored as the text itself
            table.append(token.encode())
        else:
            table.append(spell(token))
    return table


def shared_vocab(student_tok, teacher_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of two tokenizers that write the same bytes, plus their corresponding special tokens.

    Where several ids of one tokenizer write the same bytes (a byte-fallback `<0x20>` beside `▁`), the one a
    tokenization uses is kept: a piece before a byte-fallback token, then the lower id.

    Returns:
        (student ids [K], teacher ids [K]) long tensors, pairwise the same token, in student-id order.
    """
    pairs = dict(special_map(student_tok, teacher_tok))
    by_bytes = _first_id_by_bytes(teacher_tok)
    for s_bytes, s_id in _first_id_by_bytes(student_tok).items():
        t_id = by_bytes.get(s_bytes)
        if t_id is not None:
            pairs[s_id] = t_id
    ids = sorted((s, t) for s, t in pairs.items() if t is not None)
    student = torch.tensor([s for s, _ in ids], dtype=torch.long)
    return student, torch.tensor([t for _, t in ids], dtype=torch.long)


def _first_id_by_bytes(tokenizer) -> dict[bytes, int]:
    """bytes -> the id a tokenization writes them with (pieces before byte-fallback tokens, then lower ids)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: dict[bytes, int] = {}
    fallback = []
    for i, b in enumerate(token_byte_table(tokenizer)):
        if b is None or b == b"":
            continue
        if _BYTE_TOKEN.fullmatch(tokens[i] or ""):
            fallback.append((b, i))
        else:
            out.setdefault(b, i)
    for b, i in fallback:
        out.setdefault(b, i)
    return out


def special_map(student_tok, teacher_tok) -> dict[int, int | None]:
    """Each special token of the student -> the teacher's token of the same role (bos, eos, unk, pad) or string.

    Returns:
        {student special id: teacher id, or None when the teacher has no such token}.
    """
    t_vocab = teacher_tok.get_vocab()
    out: dict[int, int | None] = {}
    for role in _ROLES:
        s_id, t_id = getattr(student_tok, f"{role}_id", None), getattr(teacher_tok, f"{role}_id", None)
        if s_id is not None and s_id not in out:
            out[s_id] = t_id
    added = getattr(student_tok, "added_tokens_decoder", {}) or {}
    specials = set(student_tok.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    for s_id in sorted(specials - set(out)):
        out[s_id] = t_vocab.get(student_tok.convert_ids_to_tokens(s_id))
    return out
