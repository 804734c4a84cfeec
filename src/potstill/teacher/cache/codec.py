"""The teacher cache's codec: one sequence's sparse targets to bytes (then a zstd frame) and back.

See the package docstring for the encodings (topk lossless / compact, sampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from potstill.losses.sparse import EMPTY_LOG_MASS

_ZSTD_LEVEL = {"compact": 9, "lossless": 3}


def byte_planes(x: np.ndarray, n_planes: int) -> bytes:
    """Non-negative ints -> byte planes (all low bytes, then all next bytes...): zstd codes each plane well."""
    x = x.astype(np.uint32).reshape(-1)
    return np.stack([(x >> (8 * i)) & 0xFF for i in range(n_planes)]).astype(np.uint8).tobytes()


class Buffer:
    """Sequential reader of the arrays of one decoded record."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, dtype, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > len(self.data):
            raise ValueError("record too short")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out

    def planes(self, count: int, n_planes: int) -> np.ndarray:
        raw = self.take(np.uint8, count * n_planes).reshape(n_planes, count).astype(np.int64)
        return sum(raw[i] << (8 * i) for i in range(n_planes)) if n_planes else np.zeros(count, np.int64)


@dataclass(frozen=True)
class Codec:
    """How one sequence's targets become bytes (before zstd) and back.

    Attributes:
        targets: "topk" | "sampled" | "hidden".
        encoding: "compact" | "lossless" (ignored by sampled targets, which are exact, and hidden states, bf16).
        k: stored ids per position (top-k), the number of draws (sampled), or the hidden size H (hidden).
        vocab: vocabulary size of the ids (sets the number of byte planes of an id).
        seq_len: L, positions per sequence.
    """

    targets: str
    encoding: str
    k: int
    vocab: int
    seq_len: int

    @property
    def id_planes(self) -> int:
        return max(1, (int(self.vocab - 1).bit_length() + 7) // 8)

    def encode(self, mask: np.ndarray, ids: np.ndarray, values: np.ndarray, tail: np.ndarray) -> bytes:
        """One sequence's targets -> one zstd frame.

        Args:
            mask: [L] bool, the stored positions (n of them).
            ids: [n, k] top-k ids, most probable first; or [n, samples] sampled draws.
            values: [n, k] float32 log-probs (top-k; unused by sampled).
            tail: [n] tail mass (top-k; unused by sampled).
            For hidden targets, `values` is [n, H] float32 hidden states (stored as bf16) and ids / tail are unused.
        """
        return self.compress(self.pack(mask, ids, values, tail))

    def compress(self, raw: bytes) -> bytes:
        """The zstd frame of packed bytes (exact encodings at a faster level)."""
        exact = (self.encoding == "lossless" and self.targets == "topk") or self.targets == "hidden"
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL["lossless" if exact else "compact"]).compress(raw)

    def pack(self, mask: np.ndarray, ids: np.ndarray, values: np.ndarray, tail: np.ndarray) -> bytes:
        """`encode` before zstd (a cross-tokenizer record packs its top-k part with it)."""
        parts = [np.packbits(mask).tobytes()]
        if self.targets == "hidden":
            parts.append(byte_planes(_to_bf16_bits(values), 2))
        elif self.targets == "sampled":
            parts += self._encode_sampled(ids)
        elif self.encoding == "lossless":
            parts += [
                ids.astype(np.int32).tobytes(),
                values.astype(np.float32).tobytes(),
                tail.astype(np.float32).tobytes(),
            ]
        else:
            parts += self._encode_compact(ids, values, tail)
        return b"".join(parts)

    def _encode_compact(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> list[bytes]:
        top_lp = logprobs[:, 0].astype(np.float32)
        rest_ids, rest_lp = ids[:, 1:], logprobs[:, 1:].astype(np.float32)
        order = np.argsort(rest_ids, axis=1, kind="stable")
        rest_ids, rest_lp = np.take_along_axis(rest_ids, order, 1), np.take_along_axis(rest_lp, order, 1)
        drop = top_lp[:, None] - rest_lp  # >= 0
        span = drop.max(axis=1, initial=0.0)
        # Round the step up *before* quantizing so the deepest drop still fits in 255 steps.
        step = np.maximum(span / 255, 1e-6).astype(np.float16)
        step = np.where(step.astype(np.float32) * 255 < span, np.nextafter(step, np.float16(np.inf)), step)
        q = np.clip(np.rint(drop / step.astype(np.float32)[:, None]), 0, 255).astype(np.uint8)
        deltas = np.diff(rest_ids, axis=1, prepend=0)
        return [
            byte_planes(ids[:, 0], self.id_planes),
            top_lp.tobytes(),
            step.tobytes(),
            tail.astype(np.float16).tobytes(),
            byte_planes(deltas, self.id_planes),
            q.tobytes(),
        ]

    def _encode_sampled(self, draws: np.ndarray) -> list[bytes]:
        draws = np.sort(draws, axis=1)
        new = np.ones_like(draws, dtype=bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = np.flatnonzero(new.reshape(-1))
        ids, counts = draws.reshape(-1)[starts], np.diff(np.append(starts, draws.size))
        deltas = np.where(starts % draws.shape[1] == 0, ids, ids - np.roll(ids, 1))  # a row's first id: absolute
        unique = new.sum(axis=1)
        return [
            unique.astype(np.uint8).tobytes(),
            byte_planes(deltas, self.id_planes),
            counts.astype(np.uint8).tobytes(),
        ]

    def decode(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """zstd frame -> (mask [L] bool, ids [n, w] int64, logprobs [n, w] float32, tail [n] float32).

        Ids and log-probs come most probable first. Hidden targets: (mask, ids [n, 0], states [n, H] float32 (bf16
        values), tail [n] zeros).
        """
        data = zstandard.ZstdDecompressor().decompress(data)
        buf = Buffer(data)
        out = self.unpack(buf)
        if buf.pos != len(data):
            raise ValueError("record has trailing bytes")
        return out

    def unpack(self, buf: Buffer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`decode` after zstd: read one packed record from `buf`."""
        mask = np.unpackbits(buf.take(np.uint8, (self.seq_len + 7) // 8), count=self.seq_len).astype(bool)
        n = int(mask.sum())
        if self.targets == "hidden":
            bits = buf.planes(n * self.k, 2).astype(np.uint32) << 16
            ids, logprobs, tail = (
                np.zeros((n, 0), np.int64),
                bits.view(np.float32).reshape(n, self.k),
                np.zeros(n, np.float32),
            )
        elif self.targets == "sampled":
            ids, logprobs, tail = self._decode_sampled(buf, n)
        elif self.encoding == "lossless":
            ids = buf.take(np.int32, n * self.k).reshape(n, self.k).astype(np.int64)
            logprobs = buf.take(np.float32, n * self.k).reshape(n, self.k).copy()
            tail = buf.take(np.float32, n).copy()
        else:
            ids, logprobs, tail = self._decode_compact(buf, n)
        return mask, ids, logprobs, tail

    def _decode_compact(self, buf: Buffer, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        top = buf.planes(n, self.id_planes)
        top_lp = buf.take(np.float32, n)
        step = buf.take(np.float16, n).astype(np.float32)
        tail = buf.take(np.float16, n).astype(np.float32)
        rest = np.cumsum(buf.planes(n * (self.k - 1), self.id_planes).reshape(n, self.k - 1), axis=1)
        q = buf.take(np.uint8, n * (self.k - 1)).reshape(n, self.k - 1)
        rest_lp = top_lp[:, None] - q.astype(np.float32) * step[:, None]
        order = np.argsort(q, axis=1, kind="stable")  # most probable first; top-1 stays in front
        ids = np.concatenate([top[:, None], np.take_along_axis(rest, order, 1)], axis=1)
        logprobs = np.concatenate([top_lp[:, None], np.take_along_axis(rest_lp, order, 1)], axis=1)
        return ids, logprobs.astype(np.float32), tail

    def _decode_sampled(self, buf: Buffer, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        unique = buf.take(np.uint8, n).astype(np.int64)
        total = int(unique.sum())
        deltas = buf.planes(total, self.id_planes)
        counts = buf.take(np.uint8, total).astype(np.float32)
        starts = np.cumsum(unique) - unique
        running = np.cumsum(deltas)
        before = running[starts] - deltas[starts] if total else np.zeros(n, np.int64)
        flat_ids = running - np.repeat(before, unique)  # per-row cumulative sum of the deltas
        row, slot = np.repeat(np.arange(n), unique), np.arange(total) - np.repeat(starts, unique)
        ids = _unused_ids(n, self.k, self.vocab, flat_ids, row)
        logprobs = np.full((n, self.k), EMPTY_LOG_MASS, np.float32)
        ids[row, slot] = flat_ids
        logprobs[row, slot] = np.log(counts / self.k)
        order = np.argsort(-logprobs, axis=1, kind="stable")
        return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1), np.zeros(n, np.float32)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the bit patterns of the nearest bfloat16 (round half to even), as uint32 in 0..0xFFFF."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)


def _unused_ids(n: int, width: int, vocab: int, ids: np.ndarray, row: np.ndarray) -> np.ndarray:
    """[n, width] filler ids: per row, the smallest ids not among that row's sampled ids (distinct padding)."""
    span = min(vocab, 2 * width)  # a row has at most `width` ids, so 2 * width candidates leave `width` free
    used = np.zeros((n, span), dtype=bool)
    small = ids < span
    used[row[small], ids[small]] = True
    free = np.argsort(used, axis=1, kind="stable")[:, :width]
    return free.astype(np.int64)
