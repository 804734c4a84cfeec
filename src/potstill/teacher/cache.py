"""The offline teacher cache: run the teacher once over packed data, store sparse targets on disk, read them back.

Layout of a cache directory (see docs/cache.md for the measured sizes):

- ``build.json``: the settings and fingerprints of the build, written first (a rerun with other settings is refused).
- ``shard-00000.bin``, ...: each holds a contiguous range of packed sequences; written to a temporary name, then
  renamed, so a shard that exists is complete. A rerun skips existing shards (resume).
- ``manifest.json``: written last (= the cache is complete): build.json + token counts + sha256 and size per shard.

A shard is ``MAGIC | uint64 n | uint64 offsets[n + 1] | n zstd frames``: one frame per sequence, so a reader
decodes only the sequences a batch asks for. A sequence stores the targets of its *scored* positions only:
position t (whose logits predict token t + 1) is stored when ``labels[t + 1] != -100``, as a bit mask over the
L positions; the reader fills the other positions with harmless placeholders (uniform over ids 0..k-1), which
`shifted_targets` never selects.

Per stored position, by `targets` and `encoding`:

- topk / "lossless": int32 ids [k] and float32 log-probs [k] (most probable first), float32 tail; bit-exact.
- topk / "compact": the top-1 id (exact) and its float32 log-prob; the other k - 1 ids sorted ascending and
  delta-coded (byte planes); their log-probs as uint8 steps below the top-1 with a float16 step per position
  (step = range / 255); float16 tail. Top-1 is never lost; the reader re-sorts by probability.
- sampled (Anshumann et al. 2025): `samples` draws from the teacher distribution at the temperature; the unique
  ids (delta-coded) and their counts (uint8), exact whatever `encoding`. The reader returns logprobs =
  log(count / samples), tail 0, padded to width `samples` with unused ids of log-mass -1e4 (probability 0).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zstandard

from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX
from potstill.losses.sparse import EMPTY_LOG_MASS, SparseTargets, topk_targets

FORMAT = "potstill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
MAGIC = b"PSTSHRD1"
TARGETS = ("topk", "sampled")
ENCODINGS = ("compact", "lossless")
_ZSTD_LEVEL = {"compact": 9, "lossless": 3}
_ROW_CHUNK = 1024  # positions per log-softmax/top-k step: bounds the extra [rows, V] float32 buffers
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


# ----- fingerprints -----------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset) -> str:
    """sha256 of a PackedDataset's `input_ids` and `labels` ([N, L] each, as int64): what the cache was built on."""
    digest = hashlib.sha256()
    for tensor in (dataset.input_ids, dataset.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    spec = {"vocab": sorted(tokenizer.get_vocab().items()), **{s: getattr(tokenizer, s, None) for s in _SPECIAL}}
    return hashlib.sha256(json.dumps(spec, ensure_ascii=False).encode()).hexdigest()


def teacher_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the teacher's config.json and the sha256 of each weights file (hashes cached by size + mtime)."""
    from potstill.models.load import cache_dir, file_sha256

    root = Path(model_dir)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    known_path = cache_dir() / "file-hashes.json"
    known = _read_json(known_path) or {}
    changed = False
    for weights in sorted([*root.glob("*.safetensors"), *root.glob("*.bin")]):
        stat = weights.stat()
        key = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in known:
            known[key], changed = file_sha256(weights), True
        digest.update(f"{weights.name}:{known[key]}".encode())
    if changed:  # also forget files that are gone (tests and temporary teachers would grow the file forever)
        _try_write_json(known_path, {key: h for key, h in known.items() if Path(key.rsplit(":", 2)[0]).exists()})
    return digest.hexdigest()


# ----- encoding -----------------------------------------------------------------------------------------------


def _planes(x: np.ndarray, n_planes: int) -> bytes:
    """Non-negative ints -> byte planes (all low bytes, then all next bytes...): zstd codes each plane well."""
    x = x.astype(np.uint32).reshape(-1)
    return np.stack([(x >> (8 * i)) & 0xFF for i in range(n_planes)]).astype(np.uint8).tobytes()


class _Buffer:
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
        targets: "topk" | "sampled".
        encoding: "compact" | "lossless" (ignored by sampled targets, which are exact).
        k: stored ids per position (top-k), or the number of draws (sampled).
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
        """
        parts = [np.packbits(mask).tobytes()]
        if self.targets == "sampled":
            parts += self._encode_sampled(ids)
        elif self.encoding == "lossless":
            parts += [
                ids.astype(np.int32).tobytes(),
                values.astype(np.float32).tobytes(),
                tail.astype(np.float32).tobytes(),
            ]
        else:
            parts += self._encode_compact(ids, values, tail)
        level = _ZSTD_LEVEL["lossless" if self.encoding == "lossless" and self.targets == "topk" else "compact"]
        return zstandard.ZstdCompressor(level=level).compress(b"".join(parts))

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
            _planes(ids[:, 0], self.id_planes),
            top_lp.tobytes(),
            step.tobytes(),
            tail.astype(np.float16).tobytes(),
            _planes(deltas, self.id_planes),
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
        return [unique.astype(np.uint8).tobytes(), _planes(deltas, self.id_planes), counts.astype(np.uint8).tobytes()]

    def decode(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """zstd frame -> (mask [L] bool, ids [n, w] int64, logprobs [n, w] float32, tail [n] float32).

        Ids and log-probs come most probable first.
        """
        data = zstandard.ZstdDecompressor().decompress(data)
        buf = _Buffer(data)
        mask = np.unpackbits(buf.take(np.uint8, (self.seq_len + 7) // 8), count=self.seq_len).astype(bool)
        n = int(mask.sum())
        if self.targets == "sampled":
            ids, logprobs, tail = self._decode_sampled(buf, n)
        elif self.encoding == "lossless":
            ids = buf.take(np.int32, n * self.k).reshape(n, self.k).astype(np.int64)
            logprobs = buf.take(np.float32, n * self.k).reshape(n, self.k).copy()
            tail = buf.take(np.float32, n).copy()
        else:
            ids, logprobs, tail = self._decode_compact(buf, n)
        if buf.pos != len(data):
            raise ValueError("record has trailing bytes")
        return mask, ids, logprobs, tail

    def _decode_compact(self, buf: _Buffer, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    def _decode_sampled(self, buf: _Buffer, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _unused_ids(n: int, width: int, vocab: int, ids: np.ndarray, row: np.ndarray) -> np.ndarray:
    """[n, width] filler ids: per row, the smallest ids not among that row's sampled ids (distinct padding)."""
    span = min(vocab, 2 * width)  # a row has at most `width` ids, so 2 * width candidates leave `width` free
    used = np.zeros((n, span), dtype=bool)
    small = ids < span
    used[row[small], ids[small]] = True
    free = np.argsort(used, axis=1, kind="stable")[:, :width]
    return free.astype(np.int64)


# ----- writer -------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a build writes: settings (build.json), the packed data, and how sequences split into shards."""

    out: Path
    settings: dict
    codec: Codec
    dataset: object  # PackedDataset
    per_shard: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.dataset) // self.per_shard)

    def shard_range(self, j: int) -> range:
        return range(j * self.per_shard, min(len(self.dataset), (j + 1) * self.per_shard))

    def stored(self, indices: range) -> torch.Tensor:
        """[len(indices), L] bool: positions whose next token is scored (what the cache stores)."""
        labels = self.dataset.labels[indices.start : indices.stop]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return mask


def shard_name(j: int) -> str:
    """File name of shard j."""
    return f"shard-{j:05d}.bin"


def build_cache(
    teacher: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    *,
    k: int = 64,
    temperature: float = 1.0,
    seq_len: int = 256,
    add_bos: bool = True,
    targets: str = "topk",
    samples: int = 32,
    encoding: str = "compact",
    student: str | Path | None = None,
    batch_size: int = 8,
    shard_tokens: int = 1 << 18,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the teacher once over packed data and store its sparse next-token targets in `out` (resumable).

    Args:
        teacher: teacher HF directory (or .gguf).
        data: JSONL files, packed like training data (`potstill.data.load_dataset`).
        out: cache directory.
        k: top-k ids per position (targets="topk"), 1 <= k <= vocabulary size.
        temperature: softmax temperature of the stored distribution (the loss must use the same).
        seq_len, add_bos: packing, as in the training config.
        targets: "topk" (k most probable ids + tail mass) or "sampled" (`samples` draws, ids + counts).
        samples: draws per position for targets="sampled" (1..255).
        encoding: "compact" (quantized, ~100-150 bytes/token at k=64) or "lossless" (int32 + float32).
        student: student HF directory; its tokenizer packs the data and, with a trimmed vocabulary
            (`potstill_vocab.json`), ids are student ids (teacher renormalized over the kept ids).
        batch_size: sequences per teacher forward (bounds memory: batch x seq_len x V float32 logits).
        shard_tokens: about this many positions per shard (whole sequences).
        seed: seed of the sampled targets (each shard draws from its own seeded generator).
        dtype: the teacher's weights dtype (`potstill.models.load.DTYPES`); bfloat16 is 3-4x faster on CPUs
            with native bf16 matmuls; the log-probs are computed in float32 either way.
        overwrite: replace an existing cache built with other settings.
        progress: show a progress bar (tokens/s, ETA) on rank 0.

    Returns:
        The cache directory (with manifest.json).

    Raises:
        UserError: bad option, unloadable model or data, mismatching tokenizers, an existing cache built with
            other settings (without overwrite), disk full (the finished shards are kept: rerun to resume).
    """
    _check_options(k, temperature, seq_len, targets, samples, encoding, batch_size, shard_tokens)
    plan, scorer = _prepare(
        teacher,
        data,
        Path(out),
        k,
        temperature,
        seq_len,
        add_bos,
        targets,
        samples,
        encoding,
        student,
        shard_tokens,
        seed,
        dtype,
        overwrite,
    )
    if plan is None:  # already complete with these settings
        return Path(out)
    rank, world, barrier = _distributed()
    write_shards(plan, scorer, batch_size, rank=rank, world=world, progress=progress)
    barrier()
    if rank == 0:
        finalize(plan)
    barrier()
    return plan.out


def _check_options(k, temperature, seq_len, targets, samples, encoding, batch_size, shard_tokens) -> None:
    if targets not in TARGETS:
        raise UserError(f"cache build: --targets must be one of {', '.join(TARGETS)} (got {targets!r})")
    if encoding not in ENCODINGS:
        raise UserError(f"cache build: --encoding must be one of {', '.join(ENCODINGS)} (got {encoding!r})")
    if k < 1:
        raise UserError(f"cache build: --k must be >= 1 (got {k})")
    if not 1 <= samples <= 255:
        raise UserError(f"cache build: --samples must be in [1, 255] (counts are stored as uint8), got {samples}")
    if temperature <= 0:
        raise UserError(f"cache build: --temperature must be > 0 (got {temperature})")
    for name, value, least in (
        ("--seq-len", seq_len, 2),
        ("--batch-size", batch_size, 1),
        ("--shard-tokens", shard_tokens, 1),
    ):
        if value < least:
            raise UserError(f"cache build: {name} must be >= {least} (got {value})")


def _prepare(
    teacher,
    data,
    out,
    k,
    temperature,
    seq_len,
    add_bos,
    targets,
    samples,
    encoding,
    student,
    shard_tokens,
    seed,
    dtype,
    overwrite,
):
    """Load models and data, decide the settings; returns (None, None) when `out` already holds this cache."""
    from potstill.data.packing import load_dataset
    from potstill.models.load import DTYPES, load_model
    from potstill.teacher.online import OnlineTeacher, check_tokenizers

    if not data:
        raise UserError("cache build: give at least one --data file")
    if dtype not in DTYPES:
        raise UserError(f"cache build: --dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    model, tokenizer = load_model(teacher, dtype=dtype)
    id_map = None
    if student is not None:
        from potstill.models.vocab import load_id_map

        student_tok = _load_tokenizer(student)
        id_map = load_id_map(student)
        check_tokenizers(student_tok, tokenizer, id_map)
        tokenizer = student_tok
    vocab = len(id_map) if id_map is not None else model.get_output_embeddings().weight.shape[0]
    width = samples if targets == "sampled" else k
    if width > vocab:
        raise UserError(
            f"cache build: {'--samples' if targets == 'sampled' else '--k'} {width} exceeds the vocabulary size {vocab}"
        )
    dataset = load_dataset([Path(p) for p in data], tokenizer, seq_len, add_bos=add_bos)
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {
            "path": str(Path(teacher).resolve()),
            "fingerprint": teacher_fingerprint(model.name_or_path),
            "dtype": dtype,
        },
        "student": None
        if student is None
        else {
            "path": str(Path(student).resolve()),
            "id_map_sha256": None if id_map is None else hashlib.sha256(id_map.numpy().tobytes()).hexdigest(),
        },
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "targets": targets,
        "k": width,
        "samples": samples if targets == "sampled" else None,
        "temperature": temperature,
        "encoding": "exact-counts" if targets == "sampled" else encoding,
        "values": _VALUES[targets if targets == "sampled" else encoding],
        "seq_len": seq_len,
        "add_bos": add_bos,
        "positions": "scored",
        "data": {"files": [str(Path(p).resolve()) for p in data], "fingerprint": dataset_fingerprint(dataset)},
        "sequences": len(dataset),
        "sequences_per_shard": max(1, shard_tokens // seq_len),
        "seed": seed,
    }
    if not _claim(out, settings, overwrite):
        return None, None
    codec = Codec(targets, encoding, width, vocab, seq_len)
    plan = _Plan(out, settings, codec, dataset, settings["sequences_per_shard"])
    return plan, _Scorer(OnlineTeacher(model, id_map=id_map), codec, temperature, seed)


_VALUES = {
    "lossless": "int32 ids, float32 log-probs and tail",
    "compact": "top-1 id exact + float32 log-prob; other ids sorted, delta byte planes; log-probs uint8 steps below "
    "the top-1 (float16 step per position); float16 tail; zstd per sequence",
    "sampled": "unique sampled ids (delta byte planes) + uint8 counts; zstd per sequence",
}


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load the student's tokenizer ({str(err).splitlines()[0]})") from None


def _claim(out: Path, settings: dict, overwrite: bool) -> bool:
    """Make `out` this build's directory. False: it already holds the complete cache for these settings."""
    previous = _read_json(out / BUILD)
    if previous is not None and previous != settings:
        if not overwrite:
            diff = _first_difference(previous, settings)
            raise UserError(
                f"{out}: holds a cache built with other settings ({diff}); pass --overwrite to replace it, "
                "or choose another --out"
            )
        for path in [out / MANIFEST, out / BUILD, *out.glob("shard-*.bin")]:
            path.unlink()
        previous = None
    if previous is not None and (out / MANIFEST).is_file():
        return False
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if previous is None and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: directory is not empty and is not a teacher cache; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if previous is None:
        _atomic_write(out / BUILD, [json.dumps(settings, indent=2).encode()])
    return True


def _first_difference(old: dict, new: dict) -> str:
    key = next((key for key in new if old.get(key) != new[key]), "format")
    return f"{key}: {json.dumps(old.get(key))[:80]} vs {json.dumps(new.get(key))[:80]}"


class _Scorer:
    """Teacher forward + the cache's targets for one batch of packed sequences."""

    def __init__(self, teacher, codec: Codec, temperature: float, seed: int):
        self.teacher, self.codec, self.temperature, self.seed = teacher, codec, temperature, seed

    def records(self, batch: dict, stored: torch.Tensor, generator: torch.Generator) -> list[bytes]:
        """Encoded records ([B] zstd frames) of a batch of sequences; stored: [B, L] bool positions to keep."""
        logits = self.teacher.logits(batch["input_ids"], batch["attention_mask"])  # [B, L, V]
        return [self.codec.encode(m.numpy(), *self._targets(logits[b][m], generator)) for b, m in enumerate(stored)]

    def _targets(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[np.ndarray, ...]:
        """rows: [n, V] logits -> (ids, values, tail) numpy arrays for `Codec.encode`."""
        parts = []
        for start in range(0, max(len(rows), 1), _ROW_CHUNK):
            chunk = rows[start : start + _ROW_CHUNK]
            if self.codec.targets == "sampled":
                probs = torch.softmax(chunk.float() / self.temperature, dim=-1)
                draws = torch.zeros(0, self.codec.k, dtype=torch.long)
                if len(chunk):
                    draws = torch.multinomial(probs, self.codec.k, replacement=True, generator=generator)
                parts.append((draws, torch.zeros(0), torch.zeros(0)))
            else:
                top = topk_targets(chunk, self.codec.k, self.temperature)
                parts.append((top.ids, top.logprobs, top.tail))
        return tuple(torch.cat(col).numpy() for col in zip(*parts, strict=True))


def write_shards(
    plan: _Plan, scorer: _Scorer, batch_size: int, *, rank: int = 0, world: int = 1, progress: bool = True
) -> None:
    """Write this rank's missing shards (shard j belongs to rank j % world); existing shards are complete."""
    from tqdm.auto import tqdm

    mine = [j for j in range(rank, plan.n_shards, world) if not (plan.out / shard_name(j)).is_file()]
    total = sum(len(plan.shard_range(j)) for j in mine) * plan.codec.seq_len
    with tqdm(total=total, unit="tok", unit_scale=True, desc="teacher cache", disable=not progress or rank != 0) as bar:
        for j in mine:
            _write_shard(plan, scorer, j, batch_size, bar)


def _write_shard(plan: _Plan, scorer: _Scorer, j: int, batch_size: int, bar) -> None:
    indices = plan.shard_range(j)
    stored = plan.stored(indices)
    generator = torch.Generator().manual_seed(plan.settings["seed"] * 1_000_003 + j)
    frames = []
    for start in range(indices.start, indices.stop, batch_size):
        stop = min(start + batch_size, indices.stop)
        batch = {key: getattr(plan.dataset, key)[start:stop] for key in ("input_ids", "attention_mask")}
        records = scorer.records(batch, stored[start - indices.start : stop - indices.start], generator)
        frames += records
        bar.update((stop - start) * plan.codec.seq_len)
    offsets = np.cumsum([0, *map(len, frames)], dtype=np.uint64)
    _atomic_write(plan.out / shard_name(j), [MAGIC, struct.pack("<Q", len(frames)), offsets.tobytes(), *frames])


def finalize(plan: _Plan) -> Path:
    """Write manifest.json (last): build settings + per-shard sha256, sizes and token counts."""
    from potstill.models.load import file_sha256

    shards = []
    for j in range(plan.n_shards):
        path = plan.out / shard_name(j)
        if not path.is_file():
            raise UserError(f"{path}: shard missing after the build (a rank failed?); rerun to resume")
        indices = plan.shard_range(j)
        tokens = int(plan.stored(indices).sum())
        shards.append(
            {
                "file": path.name,
                "start": indices.start,
                "stop": indices.stop,
                "tokens": tokens,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )
    tokens, size = sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)
    manifest = {
        **plan.settings,
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": round(size / max(tokens, 1), 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
    }
    _atomic_write(plan.out / MANIFEST, [json.dumps(manifest, indent=2).encode()])
    return plan.out / MANIFEST


def _distributed():
    """(rank, world, barrier) under torchrun (gloo process group started if needed), else (0, 1, no-op)."""
    import torch.distributed as dist

    if not dist.is_available() or (not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        return 0, 1, lambda: None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def _atomic_write(path: Path, chunks: Sequence[bytes]) -> None:
    """Write to a temporary name in the same directory, then rename. Disk full -> UserError, nothing left behind."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise UserError(f"{path}: out of disk space; free space and rerun the same command to resume") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def _try_write_json(path: Path, obj: dict) -> None:
    """Best effort (a cache of hashes): a read-only home must not stop a build."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, [json.dumps(obj).encode()])
    except (OSError, UserError):
        pass


# ----- reader -------------------------------------------------------------------------------------------------


class TeacherCache:
    """Read a complete teacher cache: sparse targets per packed sequence, checks against the run, verification.

    Args:
        path: the cache directory.

    Raises:
        UserError: no such directory, no manifest (interrupted build), another format version, unreadable
            manifest, or a shard missing or of the wrong size (truncated).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such teacher cache directory")
        manifest = _read_json(self.path / MANIFEST)
        if manifest is None:
            hint = "not a teacher cache (build one with `potstill cache build`)"
            if (self.path / BUILD).is_file():
                hint = "its build was interrupted: rerun the same `potstill cache build` to resume"
            raise UserError(f"{self.path}: no {MANIFEST}; {hint}")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.path / MANIFEST}: cache format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}, this potstill reads version {FORMAT_VERSION}; "
                "rebuild it with `potstill cache build --overwrite`"
            )
        self.manifest = manifest
        try:
            self.codec = Codec(
                manifest["targets"], manifest["encoding"], manifest["k"], manifest["vocab_size"], manifest["seq_len"]
            )
            self._shards = manifest["shards"]
            self._starts = [s["start"] for s in self._shards]
        except (KeyError, TypeError) as err:
            raise UserError(f"{self.path / MANIFEST}: malformed manifest (missing {err})") from None
        for shard in self._shards:
            self._check_size(shard)
        self._offsets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.manifest["sequences"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    def check(
        self,
        *,
        tokenizer=None,
        dataset_fingerprint: str | None = None,
        temperature: float | None = None,
        teacher: str | Path | None = None,
    ) -> None:
        """Refuse to serve a run that differs from the build.

        Args:
            tokenizer: the run's (student's) tokenizer; ids must mean the same tokens.
            dataset_fingerprint: `dataset_fingerprint(packed)` of the run's data.
            temperature: the loss temperature (targets are stored at the cache's temperature).
            teacher: the run's teacher directory (its config + weights hash must match).

        Raises:
            UserError: one line naming what differs and how to fix it.
        """
        where = f"{self.path}: teacher cache"
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest["tokenizer_fingerprint"]:
            raise UserError(
                f"{where} was built with another tokenizer than this run's; rebuild it with the "
                "student's tokenizer (--student)"
            )
        if dataset_fingerprint is not None and dataset_fingerprint != self.manifest["data"]["fingerprint"]:
            raise UserError(
                f"{where} was built on other data or packing ({self.manifest['data']['files']}, "
                f"seq_len={self.manifest['seq_len']}, add_bos={self.manifest['add_bos']}); "
                "use the same data.train, data.seq_len and data.add_bos, or rebuild the cache"
            )
        if temperature is not None and abs(temperature - self.temperature) > 1e-6:
            raise UserError(
                f"{where} stores targets at temperature {self.temperature}, the loss uses {temperature}; "
                f"set loss.temperature={self.temperature} or rebuild the cache"
            )
        if teacher is not None and teacher_fingerprint(teacher) != self.manifest["teacher"]["fingerprint"]:
            raise UserError(
                f"{where} was built with another teacher ({self.manifest['teacher']['path']}) "
                f"than {teacher}; rebuild the cache for this teacher"
            )

    def targets(self, indices: Sequence[int]) -> SparseTargets:
        """Sparse next-token targets of packed sequences.

        Args:
            indices: B packed-sequence indices (as in the dataset the cache was built on).

        Returns:
            SparseTargets with ids/logprobs [B, L, k] (long / float32, most probable first) and tail [B, L]
            float32 at the cache's temperature; position t holds the distribution of token t + 1. Positions
            that are not stored (next token not scored) hold placeholders: ids 0..k-1, log(1/k), tail 0.
        """
        seqs = [self._sequence(int(i)) for i in indices]
        length, width = self.codec.seq_len, self.codec.k
        ids = np.broadcast_to(np.arange(width), (len(seqs), length, width)).copy()
        logprobs = np.full((len(seqs), length, width), -np.log(width), dtype=np.float32)
        tail = np.zeros((len(seqs), length), dtype=np.float32)
        for b, (mask, seq_ids, seq_lp, seq_tail) in enumerate(seqs):
            ids[b, mask], logprobs[b, mask], tail[b, mask] = seq_ids, seq_lp, seq_tail
        return SparseTargets(
            torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail), temperature=self.temperature
        )

    def verify(self, sample: int = 8) -> dict:
        """Re-hash every shard, decode every sequence; summarize (tokens, bytes/token, k) with a fidelity sample.

        The fidelity sample (first `sample` sequences of each shard) checks what can be checked without the
        teacher: mean kept mass (1 - tail), mean top-1 probability, and the largest |sum(p) + tail - 1|
        (quantization error of the compact encoding; 0 up to float rounding for lossless; sampled: sum = 1).

        Raises:
            UserError: naming the first shard whose checksum or content is wrong.
        """
        from potstill.models.load import file_sha256

        tokens, kept, top1, worst = 0, [], [], 0.0
        for j, shard in enumerate(self._shards):
            if file_sha256(self.path / shard["file"]) != shard["sha256"]:
                raise UserError(
                    f"{self.path / shard['file']}: checksum mismatch (corrupted or modified shard); "
                    "rebuild the cache (`potstill cache build --overwrite`)"
                )
            for i in range(shard["start"], shard["stop"]):
                mask, _, logprobs, tail = self._sequence(i)
                tokens += int(mask.sum())
                if i - shard["start"] < sample and len(logprobs):
                    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
                    kept.append(mass)
                    top1.append(np.exp(logprobs[:, 0].astype(np.float64)))
                    worst = max(worst, float(np.abs(mass + tail - 1).max()))
            self._offsets.pop(j, None)
        if tokens != self.manifest["tokens"]:
            raise UserError(f"{self.path}: shards hold {tokens} tokens, the manifest says {self.manifest['tokens']}")
        size = sum(s["bytes"] for s in self._shards)
        return {
            "sequences": len(self),
            "tokens": tokens,
            "shards": len(self._shards),
            "bytes": size,
            "bytes_per_token": size / max(tokens, 1),
            "targets": self.manifest["targets"],
            "k": self.codec.k,
            "encoding": self.manifest["encoding"],
            "temperature": self.temperature,
            "fidelity_sample": {
                "positions": int(sum(map(len, kept))),
                "mean_kept_mass": float(np.concatenate(kept).mean()) if kept else None,
                "mean_top1_prob": float(np.concatenate(top1).mean()) if top1 else None,
                "max_normalization_error": worst,
            },
        }

    # -- internals --

    def _check_size(self, shard: dict) -> None:
        path = self.path / shard["file"]
        if not path.is_file():
            raise UserError(
                f"{path}: shard missing from the teacher cache; rebuild it (`potstill cache build --overwrite`)"
            )
        if path.stat().st_size != shard["bytes"]:
            raise UserError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated or "
                "modified shard); rebuild the cache (`potstill cache build --overwrite`)"
            )

    def _sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decoded sequence i: (mask [L] bool, ids [n, k], logprobs [n, k], tail [n])."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range: the cache holds {len(self)}")
        j = bisect_right(self._starts, i) - 1
        path = self.path / self._shards[j]["file"]
        try:
            with open(path, "rb") as fh:
                offsets = self._shard_offsets(j, fh)
                row = i - self._shards[j]["start"]
                fh.seek(len(MAGIC) + 8 + offsets.nbytes + int(offsets[row]))
                frame = fh.read(int(offsets[row + 1] - offsets[row]))
            return self.codec.decode(frame)
        except (OSError, ValueError, zstandard.ZstdError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"{path}: cannot decode sequence {i} ({why}); the shard is corrupted: run `potstill cache verify`, "
                "rebuild with --overwrite"
            ) from None

    def _shard_offsets(self, j: int, fh) -> np.ndarray:
        if j not in self._offsets:
            head = fh.read(len(MAGIC) + 8)
            expected = self._shards[j]["stop"] - self._shards[j]["start"]
            if head[: len(MAGIC)] != MAGIC or struct.unpack("<Q", head[len(MAGIC) :])[0] != expected:
                raise ValueError("bad shard header")
            self._offsets[j] = np.frombuffer(fh.read(8 * (expected + 1)), dtype=np.uint64)
            if len(self._offsets[j]) != expected + 1:
                raise ValueError("truncated shard header")
        return self._offsets[j]


def verify_report(path: str | Path) -> str:
    """`potstill cache verify`: verify the cache and format the summary as lines of text."""
    summary = TeacherCache(path).verify()
    fid = summary["fidelity_sample"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return "\n".join(
        [
            f"ok: {summary['shards']} shards, {summary['sequences']} sequences, {summary['tokens']} tokens, "
            f"{summary['bytes']} bytes ({summary['bytes_per_token']:.1f} bytes/token)",
            f"targets: {summary['targets']}, k={summary['k']}, encoding={summary['encoding']}, "
            f"T={summary['temperature']}",
            f"fidelity sample ({fid['positions']} positions): mean kept mass {fmt(fid['mean_kept_mass'])}, mean top-1 "
            f"prob {fmt(fid['mean_top1_prob'])}, max |sum p + tail - 1| {fid['max_normalization_error']:.2e}",
        ]
    )


def info_text(path: str | Path) -> str:
    """`potstill cache info`: the manifest as indented JSON (after the reader's checks)."""
    return json.dumps(TeacherCache(path).manifest, indent=2)
