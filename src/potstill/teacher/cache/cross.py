"""A teacher cache for a student with another tokenizer (cross-tokenizer KD read offline, docs/cross_tokenizer.md).

Built like every teacher cache (`build_cache` with `--student` of another tokenizer family: same shards, manifest,
checksums, resume), on the student's packed sequences. For each one the teacher reads the same text through its own
tokenizer (`potstill.data.crossbatch`), and the record stores the teacher's side of the cross-tokenizer loss:

- the student's scored positions (bit mask [L], as every record: `potstill cache verify` counts them);
- the teacher's token stream of the row: each token's end as a byte offset into the row's text (delta-coded), and
  whether the teacher reads it (a placeholder for cut bytes is not read);
- the teacher's log-likelihood (T = 1, float32) of each token it predicts: term (a), exact;
- at the tokens of 1:1 groups, its k most probable ids of the shared vocabulary, as *student* ids, with their
  log-probs at the cache's temperature and the rest of its mass (`losses.align.shared_topk`), in the cache's
  encoding (`Codec`, compact or lossless): term (b), exact up to the top-k truncation (k >= the shared vocabulary
  keeps all of it).

Reading (`CrossCache.targets_for`) rebuilds the alignment from the student's batch and the stored byte offsets, so
neither the teacher nor its tokenizer is needed at training time. The cache serves the student tokenizer it was built
for (its fingerprint is checked, as for every cache); the run's loss is `losses.align.cross_tokenizer_terms`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np
import torch
import zstandard

from potstill.data.crossbatch import TeacherRow, assemble, student_stream
from potstill.data.tokenbytes import token_byte_table
from potstill.errors import UserError
from potstill.losses.align import CrossTargets, StoredTeacher, shared_topk
from potstill.losses.fused import TeacherHead, default_chunk_size
from potstill.losses.sparse import SparseTargets
from potstill.models.heads import head_of
from potstill.teacher.cache.codec import Buffer, Codec, byte_planes


@dataclass
class Row:
    """One decoded cross-tokenizer record.

    Attributes:
        mask: [L] bool, the student's scored positions.
        ends: [n] int64, end of each teacher stream token in bytes from the row's start.
        fed: [n] bool, the teacher reads the token (False: a placeholder).
        logp: [n] float32, the teacher's log-prob of each token it predicts (0 elsewhere).
        one: [n] bool, the token is a 1:1 group's (views stored).
        ids, logprobs, tail: [m, k], [m, k], [m] the views of the m 1:1 tokens (student ids, most probable first).
    """

    mask: np.ndarray
    ends: np.ndarray
    fed: np.ndarray
    logp: np.ndarray
    one: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray


@dataclass(frozen=True)
class CrossCodec:
    """A cross-tokenizer record <-> bytes: the row's teacher stream, then its views packed by `views` (a top-k
    `Codec` over the student's vocabulary; its seq_len is replaced by each row's stream length)."""

    views: Codec

    @property
    def targets(self) -> str:
        return self.views.targets

    @property
    def k(self) -> int:
        return self.views.k

    @property
    def seq_len(self) -> int:
        return self.views.seq_len

    def encode(self, row: Row) -> bytes:
        n = len(row.ends)
        parts = [
            np.packbits(row.mask).tobytes(),
            struct.pack("<I", n),
            byte_planes(np.diff(row.ends, prepend=0), 4),
            np.packbits(row.fed).tobytes(),
            row.logp.astype(np.float32).tobytes(),
            replace(self.views, seq_len=n).pack(row.one, row.ids, row.logprobs, row.tail),
        ]
        return self.views.compress(b"".join(parts))

    def decode_row(self, data: bytes) -> Row:
        data = zstandard.ZstdDecompressor().decompress(data)
        buf = Buffer(data)
        mask = np.unpackbits(buf.take(np.uint8, (self.seq_len + 7) // 8), count=self.seq_len).astype(bool)
        n = int(buf.take(np.uint32, 1)[0])
        ends = np.cumsum(buf.planes(n, 4))
        fed = np.unpackbits(buf.take(np.uint8, (n + 7) // 8), count=n).astype(bool)
        logp = buf.take(np.float32, n).copy()
        one, ids, logprobs, tail = replace(self.views, seq_len=n).unpack(buf)
        if buf.pos != len(data):
            raise ValueError("record has trailing bytes")
        return Row(mask, ends, fed, logp, one, ids, logprobs, tail)

    def decode(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`Codec.decode`'s shape (what `TeacherCache.verify` reads): (student mask [L], the views' ids, log-probs,
        tail)."""
        row = self.decode_row(data)
        return row.mask, row.ids, row.logprobs, row.tail


class CrossScorer:
    """The teacher's records of a batch of student sequences (`writer._Scorer`'s role for a cross-tokenizer cache).

    Args:
        teacher: a `teacher.cross.CrossTokenizerTeacher` (the model and both tokenizers).
        codec: the cache's `CrossCodec`.
        temperature: of the stored views (term (a) is always at T = 1).
    """

    def __init__(self, teacher, codec: CrossCodec, temperature: float):
        self.teacher, self.codec, self.temperature = teacher, codec, temperature

    @torch.no_grad()
    def records(self, batch: dict, stored: torch.Tensor, generator: torch.Generator) -> list[bytes]:
        """Encoded records ([B] zstd frames); batch: student `input_ids`, `attention_mask`, `labels` [B, L];
        stored: [B, L] the student's scored positions."""
        tokens, model = self.teacher.tokens, self.teacher.model
        stream = student_stream(tokens.student_table, batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows = tokens.teacher_rows(stream)
        t_ids, t_mask, align = assemble(rows, stream, tokens.pad_id, tokens.max_length, torch.device("cpu"))
        hidden = model.base_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
        weight, softcap = head_of(model)
        head = TeacherHead(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight, softcap=softcap)
        targets = CrossTargets(head, align, tokens.student_shared, tokens.teacher_shared)
        _, one = align.scored_groups()
        one = one[align.t_group] & align.t_ok  # the tokens of 1:1 groups: views stored
        n, k = align.t_ids.numel(), self.codec.k
        logp, ids, logprobs, tail = (
            np.zeros(n, np.float32),
            np.zeros((n, k), np.int64),
            np.zeros((n, k), np.float32),
            np.zeros(n, np.float32),
        )
        for part in align.t_ok.nonzero().squeeze(-1).split(default_chunk_size(weight.shape[0])):
            logits = head.rows(align.t_rows[part]).logits()
            logp[part.numpy()] = torch.log_softmax(logits, -1).gather(-1, align.t_ids[part, None]).squeeze(-1).numpy()
            sel = one[part]
            if sel.any():
                top = shared_topk(logits[sel], targets, k, self.temperature)
                at = part[sel].numpy()
                ids[at], logprobs[at], tail[at] = top.ids.numpy(), top.logprobs.numpy(), top.tail.numpy()
        out, first = [], 0
        for b, row in enumerate(rows):
            span = slice(first, first + len(row.ends))
            first, keep = span.stop, one[span].numpy()
            record = Row(
                mask=stored[b].numpy(),
                ends=np.asarray(row.ends, np.int64) - stream.starts[b],
                fed=np.asarray(row.pos) >= 0,
                logp=logp[span],
                one=keep,
                ids=ids[span][keep],
                logprobs=logprobs[span][keep],
                tail=tail[span][keep],
            )
            out.append(self.codec.encode(record))
        return out


class CrossCache:
    """A cross-tokenizer cache serving a training run: `targets_for(inputs)` is `CrossTokenizerTeacher.targets_for`
    read from disk (batches carry `index` [B], their packed-sequence indices).

    Args:
        cache: the opened `TeacherCache` (a cross-tokenizer one, already checked against the run).
        tokenizer: the student's tokenizer (its bytes per id rebuild the alignment).
    """

    def __init__(self, cache, tokenizer):
        self.cache, self.table = cache, token_byte_table(tokenizer)

    def targets_for(self, inputs: dict) -> CrossTargets:
        """CrossTargets with a `StoredTeacher` ([Nt] log-probs, [Nt, k] views) on the batch's device.

        Raises:
            UserError: a record that does not fit the batch's text (the cache was built on other data).
        """
        stream = student_stream(self.table, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"])
        indices = inputs["index"].tolist()
        records = [self.cache.read(int(i), self.cache.codec.decode_row) for i in indices]
        rows = []
        for b, (i, rec) in enumerate(zip(indices, records, strict=True)):
            covered = int(rec.ends[-1]) if len(rec.ends) else 0
            if covered != stream.lengths[b]:
                raise UserError(
                    f"{self.cache.path}: sequence {i} of the cache covers {covered} bytes, the batch's row"
                    f" {stream.lengths[b]}: the cache was built on other data; rebuild it for this run's data"
                )
            pos = np.where(rec.fed, np.cumsum(rec.fed) - 1, -1)
            rows.append(
                TeacherRow(
                    fed=[0] * int(rec.fed.sum()),
                    ends=(rec.ends + stream.starts[b]).tolist(),
                    ids=[0] * len(rec.ends),
                    pos=pos.tolist(),
                )
            )
        device = inputs["input_ids"].device
        _, _, align = assemble(rows, stream, 0, None, device)
        k = self.cache.codec.k
        one = np.concatenate([rec.one for rec in records])
        ids = np.broadcast_to(np.arange(k), (len(one), k)).copy()
        logprobs = np.full((len(one), k), -np.log(k), np.float32)
        tail = np.zeros(len(one), np.float32)
        ids[one] = np.concatenate([rec.ids for rec in records])
        logprobs[one] = np.concatenate([rec.logprobs for rec in records])
        tail[one] = np.concatenate([rec.tail for rec in records])
        _, pairs = align.scored_groups()
        if not bool(torch.as_tensor(one, device=device)[pairs[align.t_group] & align.t_ok].all()):
            raise UserError(f"{self.cache.path}: the batch aligns other tokens one to one than the cache stored;"
                            " rebuild it for this run's data")  # fmt: skip
        views = SparseTargets(
            torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail), self.cache.temperature
        )
        teacher = StoredTeacher(
            logp=torch.from_numpy(np.concatenate([rec.logp for rec in records])).double().to(device),
            views=replace(
                views, ids=views.ids.to(device), logprobs=views.logprobs.to(device), tail=views.tail.to(device)
            ),
        )
        return CrossTargets(teacher=teacher, align=align)
