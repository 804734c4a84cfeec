"""The teacher's tokenization of a student batch: the same bytes through the teacher's tokenizer, aligned.

A packed student row is a stream of text tokens and special tokens (`<bos>`, `<eos>` between documents, padding
after). `CrossTokenizer.teacher_batch` writes each run of text tokens back as bytes (`token_byte_table`), has the
teacher's tokenizer tokenize that text (its byte offsets say where each teacher token ends), and puts the teacher's
token of the same role in place of each special token (`special_map`). Both sides then end tokens at offsets of one
byte stream, in which every special token counts as one byte of its own, and `losses.align.align_groups` groups
them.

A run of text whose bytes are not valid UTF-8 at its ends (a window of the packer cut inside a character spelled
in byte tokens) gives the teacher the valid middle; the cut bytes become placeholder teacher tokens that the teacher
never reads or predicts, so the groups holding them are not scored. A student special token the teacher has no
counterpart for is such a placeholder too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from potstill.data.packing import token_bytes
from potstill.data.tokenbytes import shared_vocab, special_map, token_byte_table
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX
from potstill.losses.align import Alignment, align_groups


def _utf8_cut(data: bytes) -> tuple[int, int]:
    """(bytes to drop at the start, at the end) so that the rest is valid UTF-8 (a cut character at either end)."""
    head = 0
    while head < min(3, len(data)) and 0x80 <= data[head] < 0xC0:  # continuation bytes of a character cut before
        head += 1
    tail = 0
    for back in range(1, min(4, len(data) - head) + 1):  # a lead byte whose character is cut after
        byte = data[-back]
        if byte < 0x80:
            break
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            tail = back if need > back else 0
            break
    return head, tail


@dataclass
class TeacherRow:
    """One row's teacher side: the ids it reads (`fed`), and per stream token its end offset, id and position in
    `fed` (-1: a placeholder the teacher never reads). A teacher cache stores `ends` and which tokens are fed."""

    fed: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)

    def add(self, end: int, token: int | None) -> None:
        self.ends.append(end)
        self.ids.append(0 if token is None else token)
        self.pos.append(-1 if token is None else len(self.fed))
        if token is not None:
            self.fed.append(token)


@dataclass
class StudentStream:
    """The student's side of a batch, in stream order, and how its rows split into text runs.

    Attributes:
        s_rows, s_ids, s_ok, s_ends: per kept student token (see `Alignment`), `s_ends` global byte offsets.
        starts: [B] global offset where each row's stream starts (a teacher cache stores row-relative ends).
        lengths: [B] bytes of each row's stream.
        layout: per row, ("text", piece index) or ("special", student id) in order.
        pieces: the text runs' bytes.
        shape: (B, L) of the student batch.
    """

    s_rows: list[int]
    s_ids: list[int]
    s_ok: list[bool]
    s_ends: list[int]
    starts: list[int]
    lengths: list[int]
    layout: list[list[tuple[str, object]]]
    pieces: list[bytes]
    shape: tuple[int, int]


def student_stream(
    table: list[bytes | None], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> StudentStream:
    """The student's tokens of a batch as one byte stream (special tokens count as one byte, one gap byte per row).

    Args:
        table: the student's `token_byte_table` (None: a special token).
        input_ids: [B, L]; attention_mask: [B, L] (0 = padding, not in the stream) or None.
        labels: [B, L] unshifted student labels (-100 = not scored).
    """
    ids = input_ids.cpu().numpy()
    keep = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.cpu().numpy() > 0
    ok_label = labels.cpu().numpy() != IGNORE_INDEX
    B, L = ids.shape
    out = StudentStream([], [], [], [], [], [], [], [], (B, L))
    cursor = 0
    for b in range(B):
        out.starts.append(cursor)
        plan, run = [], []
        for i in np.flatnonzero(keep[b]):
            token = int(ids[b, i])
            out.s_rows.append(b * L + max(i - 1, 0))
            out.s_ids.append(token)
            out.s_ok.append(bool(i >= 1 and ok_label[b, i]))
            data = table[token] if token < len(table) else None
            if data is None:
                if run:
                    plan.append(("text", len(out.pieces)))
                    out.pieces.append(b"".join(run))
                    run = []
                cursor += 1
                out.s_ends.append(cursor)
                plan.append(("special", token))
            else:
                run.append(data)
                cursor += len(data)
                out.s_ends.append(cursor)
        if run:
            plan.append(("text", len(out.pieces)))
            out.pieces.append(b"".join(run))
        out.lengths.append(cursor - out.starts[-1])
        cursor += 1  # a gap byte between rows: no group spans two rows
        out.layout.append(plan)
    return out


def assemble(
    rows: list[TeacherRow], stream: StudentStream, pad_id: int, max_length: int | None, device
) -> tuple[torch.Tensor, torch.Tensor, Alignment]:
    """Pad the teacher rows into tensors ([B, Lt] ids and mask) and build the `Alignment` of both sides.

    Raises:
        UserError: a teacher row longer than `max_length` (the teacher's context length).
    """
    length = max((len(r.fed) for r in rows), default=0) or 1
    if max_length is not None and length > max_length:
        raise UserError(
            f"the teacher's tokenization of a training sequence is {length} tokens, longer than its context length"
            f" {max_length}: lower data.seq_len (the student's tokens per sequence)"
        )
    t_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    t_mask = torch.zeros((len(rows), length), dtype=torch.long)
    t_rows, t_tok, t_ok, t_ends = [], [], [], []
    for b, row in enumerate(rows):
        t_ids[b, : len(row.fed)] = torch.tensor(row.fed, dtype=torch.long)
        t_mask[b, : len(row.fed)] = 1
        pos = np.asarray(row.pos, dtype=np.int64)
        t_rows.extend((b * length + np.maximum(pos - 1, 0)).tolist())
        t_ok.extend((pos >= 1).tolist())
        t_tok.extend(row.ids)
        t_ends.extend(row.ends)
    s_group, t_group, n = align_groups(_long(stream.s_ends), _long(t_ends))
    align = Alignment(
        s_rows=_long(stream.s_rows),
        s_ids=_long(stream.s_ids),
        s_ok=torch.tensor(stream.s_ok, dtype=torch.bool),
        s_group=s_group,
        t_rows=_long(t_rows),
        t_ids=_long(t_tok),
        t_ok=torch.tensor(t_ok, dtype=torch.bool),
        t_group=t_group,
        n_groups=n,
    )
    return t_ids.to(device), t_mask.to(device), align.to(device)


class CrossTokenizer:
    """Turns student batches into the teacher's tokenization of the same text, with the alignment.

    Args:
        student_tok, teacher_tok: fast HF tokenizers (the teacher's gives byte offsets).
        max_length: the teacher's context length (longer teacher rows are refused), or None.

    Raises:
        UserError: a slow tokenizer on either side.
    """

    def __init__(self, student_tok, teacher_tok, max_length: int | None = None):
        if not getattr(teacher_tok, "is_fast", False):
            raise UserError(
                f"{teacher_tok.name_or_path}: the teacher's tokenizer is a slow one (no byte offsets): cross-tokenizer"
                " KD cannot align it; give the teacher a fast tokenizer (tokenizer.json, e.g. AutoTokenizer with"
                " use_fast=True and save_pretrained)"
            )
        self.student_table = token_byte_table(student_tok)
        self.teacher_tok = teacher_tok
        self.specials = special_map(student_tok, teacher_tok)
        self.student_shared, self.teacher_shared = shared_vocab(student_tok, teacher_tok)
        self.max_length = max_length
        self.pad_id = next((t for t in (teacher_tok.pad_token_id, teacher_tok.eos_token_id) if t is not None), 0)

    def teacher_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Alignment]:
        """The teacher's rows for a student batch, and the alignment of both.

        Args:
            input_ids: [B, L] student ids; attention_mask: [B, L] (0 = padding, not in the stream) or None.
            labels: [B, L] unshifted student labels (-100 = not scored).

        Returns:
            (teacher ids [B, Lt], teacher attention mask [B, Lt], Alignment) on the inputs' device.

        Raises:
            UserError: a teacher row longer than the teacher's context length.
        """
        stream = student_stream(self.student_table, input_ids, attention_mask, labels)
        return assemble(self.teacher_rows(stream), stream, self.pad_id, self.max_length, input_ids.device)

    def check_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, where: str) -> None:
        """Refuse packed data whose teacher tokenization of a row exceeds the teacher's context (before a run starts).

        Args:
            input_ids, attention_mask: [N, L] the packed student rows (all of them are tokenized, 256 at a time).
            where: what the rows are, for the message (e.g. the data option).

        Raises:
            UserError: naming the first longest row, its teacher length, the context length and data.seq_len.
        """
        if self.max_length is None:
            return
        for start in range(0, len(input_ids), 256):
            ids = input_ids[start : start + 256]
            mask = None if attention_mask is None else attention_mask[start : start + 256]
            lengths = [len(row.fed) for row in self.teacher_rows(student_stream(self.student_table, ids, mask, ids))]
            worst = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[worst] > self.max_length:
                raise UserError(
                    f"{where}: packed sequence {start + worst} is {lengths[worst]} tokens in the teacher's"
                    f" tokenization, longer than its context length {self.max_length}: lower data.seq_len (now"
                    f" {ids.shape[1]} student tokens per sequence)"
                )

    def teacher_rows(self, stream: StudentStream) -> list[TeacherRow]:
        """The teacher's tokenization of each row of a student stream (text runs tokenized in one call)."""
        t_parts = self._tokenize(stream.pieces)
        rows = []
        for b, plan in enumerate(stream.layout):
            cursor, row = stream.starts[b], TeacherRow()
            for kind, value in plan:
                if kind == "special":
                    cursor += 1
                    row.add(cursor, self.specials.get(value))
                    continue
                data = stream.pieces[value]
                head, tail, t_ids, t_nbytes = t_parts[value]
                if head:
                    row.add(cursor + head, None)
                for token, end in zip(t_ids, cursor + head + np.cumsum(t_nbytes), strict=True):
                    row.add(int(end), token)
                if tail:
                    row.add(cursor + len(data), None)
                cursor += len(data)
            rows.append(row)
        return rows

    def _tokenize(self, texts: list[bytes]) -> list[tuple[int, int, list[int], np.ndarray]]:
        """Per text: (cut bytes at the start, at the end, teacher ids, bytes each teacher token covers)."""
        cuts = [_utf8_cut(data) for data in texts]
        middles = [data[h : len(data) - t] for data, (h, t) in zip(texts, cuts, strict=True)]
        strings = [m.decode("utf-8", errors="replace") for m in middles]
        if not strings:
            return []
        enc = self.teacher_tok(strings, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for data, middle, (head, tail), text, t_ids, offsets in zip(
            texts, middles, cuts, strings, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            if len(text.encode()) != len(middle):  # invalid UTF-8 inside: the whole run is a placeholder
                out.append((len(data), 0, [], np.zeros(0, dtype=np.int64)))
            else:
                out.append((head, tail, t_ids, token_bytes(text, offsets)))
        return out


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
