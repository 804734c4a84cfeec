"""Building a teacher cache: run the teacher once over packed data and write its shards, then the manifest.

`build_cache` claims the directory (`build.json` first: a rerun with other settings is refused), writes the
missing shards (under torchrun, shard j belongs to rank j % world), and rank 0 writes `manifest.json` last.
Every file is written to a temporary name and renamed (`potstill.fileio`), so a shard that exists is complete
and an interrupted build resumes from its last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from potstill.errors import UserError
from potstill.fileio import is_temp, remove_stale_temps, write_bytes_atomic, write_json_atomic
from potstill.launch import world_size
from potstill.losses import scored_mask
from potstill.losses.sparse import topk_targets
from potstill.models.heads import linear_head
from potstill.signals import StopSignals
from potstill.teacher.cache.codec import Codec
from potstill.teacher.cache.cross import CrossCodec, CrossScorer
from potstill.teacher.cache.format import (
    BUILD,
    CROSS_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    MAGIC,
    MANIFEST,
    dataset_fingerprint,
    manifest_checksum,
    read_json,
    shard_name,
    teacher_fingerprint,
    tokenizer_fingerprint,
)

_ROW_CHUNK = 1024  # positions per log-softmax/top-k step: bounds the extra [rows, V] float32 buffers


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
        mask[:, :-1] = scored_mask(labels)
        return mask


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

    The settings are the fields of `potstill.config.CacheConfig` (`build_cache(**cfg.model_dump())` is what
    `potstill cache build` does) and are validated by it; a bad one is reported under its CLI option, as the
    command reports it (`--k must be >= 1 (got 0)`).

    Args:
        teacher: teacher HF directory (or .gguf).
        data: JSONL files, packed like training data (`potstill.data.load_dataset`).
        out: cache directory.
        k: top-k ids per position (targets="topk"), 1 <= k <= vocabulary size.
        temperature: softmax temperature of the stored distribution (the loss must use the same).
        seq_len, add_bos: packing, as in the training config.
        targets: "topk" (k most probable ids + tail mass), "sampled" (`samples` draws, ids + counts) or "hidden"
            (the final hidden state per position, bf16; `k`, `temperature` and `encoding` do not apply).
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
    from potstill.config import CacheConfig, validate_config

    settings = dict(
        teacher=str(teacher), data=[str(p) for p in ([data] if isinstance(data, (str, Path)) else data)],
        out=str(out), k=k, temperature=temperature, seq_len=seq_len, add_bos=add_bos, targets=targets,
        samples=samples, encoding=encoding, student=None if student is None else str(student), batch_size=batch_size,
        shard_tokens=shard_tokens, seed=seed, dtype=dtype, overwrite=overwrite,
    )  # fmt: skip
    c = validate_config(settings, CacheConfig, given=settings)
    plan, scorer = _prepare(
        c.teacher, c.data, Path(c.out), c.k, c.temperature, c.seq_len, c.add_bos, c.targets, c.samples, c.encoding,
        c.student, c.shard_tokens, c.seed, c.dtype, c.overwrite,
    )  # fmt: skip
    if plan is None:  # already complete with these settings
        return Path(out)
    rank, world, barrier = _distributed()
    write_shards(plan, scorer, c.batch_size, rank=rank, world=world, progress=progress)
    barrier()
    if rank == 0:
        finalize(plan)
    barrier()
    return plan.out


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
    """Load models and data, decide the settings (validated by `build_cache`); (None, None): `out` holds this cache."""
    from potstill.data.packing import load_dataset
    from potstill.models.load import load_model, load_tokenizer
    from potstill.teacher.cross import CrossTokenizerTeacher, shares_ids
    from potstill.teacher.online import OnlineTeacher, check_tokenizers

    model, tokenizer = load_model(teacher, dtype=dtype)
    id_map = cross = None
    if student is not None:
        from potstill.models.vocab import load_id_map

        student_tok = load_tokenizer(student)
        id_map = load_id_map(student)
        if shares_ids(student_tok, tokenizer, id_map):
            check_tokenizers(student_tok, tokenizer, id_map)
        else:  # another tokenizer: the teacher reads the student's text through its own (teacher.cache.cross)
            if targets != "topk":
                raise UserError(
                    f"--targets {targets}: a cache for a student with another tokenizer ({student}) stores top-k"
                    " targets over the shared vocabulary; use --targets topk"
                )
            cross, id_map = CrossTokenizerTeacher(model, student_tok, tokenizer), None
            teacher_tok_fingerprint = tokenizer_fingerprint(tokenizer)
        tokenizer = student_tok
    vocab = len(id_map) if id_map is not None else model.get_output_embeddings().weight.shape[0]
    if cross is not None:  # views hold student ids of the shared vocabulary
        vocab, k = len(tokenizer), min(k, cross.tokens.student_shared.numel())
    width = {"sampled": samples, "hidden": model.config.hidden_size}.get(targets, k)
    if targets == "hidden" and linear_head(model) is None:
        raise UserError(f"{teacher}: --targets hidden needs a teacher whose head is a plain linear layer")
    if targets != "hidden" and width > vocab:
        raise UserError(
            f"cache build: {'samples' if targets == 'sampled' else 'k'}={width} exceeds the vocabulary size {vocab}"
        )
    dataset = load_dataset([Path(p) for p in data], tokenizer, seq_len, add_bos=add_bos)
    if cross is not None:  # before build.json: a refused build leaves nothing behind
        cross.tokens.check_context(dataset.input_ids, dataset.attention_mask, "--data")
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if cross is None else CROSS_FORMAT_VERSION,
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
        "temperature": None if targets == "hidden" else temperature,
        "encoding": {"sampled": "exact-counts", "hidden": "bf16"}.get(targets, encoding),
        "values": VALUES[targets if targets in ("sampled", "hidden") else encoding],
        "seq_len": seq_len,
        "add_bos": add_bos,
        "positions": "scored",
        "data": {"files": [str(Path(p).resolve()) for p in data], "fingerprint": dataset_fingerprint(dataset)},
        "sequences": len(dataset),
        "sequences_per_shard": max(1, shard_tokens // seq_len),
        "seed": seed,
    }
    if cross is not None:
        settings["cross_tokenizer"] = {
            "teacher_tokenizer_fingerprint": teacher_tok_fingerprint,
            "shared_tokens": cross.tokens.student_shared.numel(),
            "teacher_context": cross.tokens.max_length,
        }
    if not claim(out, settings, overwrite):
        return None, None
    codec = Codec(targets, encoding, width, vocab, seq_len)
    if cross is not None:
        codec = CrossCodec(codec)
        plan = _Plan(out, settings, codec, dataset, settings["sequences_per_shard"])
        return plan, CrossScorer(cross, codec, temperature)
    plan = _Plan(out, settings, codec, dataset, settings["sequences_per_shard"])
    return plan, _Scorer(OnlineTeacher(model, id_map=id_map), codec, temperature, seed)


VALUES = {
    "lossless": "int32 ids, float32 log-probs and tail",
    "compact": "top-1 id exact + float32 log-prob; other ids sorted, delta byte planes; log-probs uint8 steps below "
    "the top-1 (float16 step per position); float16 tail; zstd per sequence",
    "sampled": "unique sampled ids (delta byte planes) + uint8 counts; zstd per sequence",
    "hidden": "final hidden states (after the final norm), bf16 in 2 byte planes; zstd per sequence",
}


def claim(out: Path, settings: dict, overwrite: bool) -> bool:
    """Make `out` this build's directory. False: it already holds the complete cache for these settings.

    The temporary files of a killed build (a shard or the manifest caught between write and rename) are deleted.
    """
    remove_stale_temps(out)
    previous = read_json(out / BUILD)
    if previous is not None and previous != settings:
        if not overwrite:
            diff = _first_difference(previous, settings)
            raise UserError(
                f"{out}: holds a cache built with other settings ({diff}); set overwrite (--overwrite) to replace it,"
                " or choose another out (--out)"
            )
        for path in [out / MANIFEST, out / BUILD, *out.glob("shard-*.bin")]:
            path.unlink(missing_ok=True)  # an interrupted build has no manifest
        previous = None
    if previous is not None and (out / MANIFEST).is_file():
        return False
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if previous is None and out.is_dir() and any(not is_temp(p.name) for p in out.iterdir()) and not overwrite:
        raise UserError(f"{out}: directory is not empty and is not a teacher cache; choose another out (--out)")
    out.mkdir(parents=True, exist_ok=True)
    if previous is None:
        write_json_atomic(out / BUILD, settings)
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
        if self.codec.targets == "hidden":
            hidden = self.teacher.head_inputs(batch["input_ids"], batch["attention_mask"]).hidden.float()  # [B, L, H]
            return [self.codec.encode(m.numpy(), None, hidden[b][m].numpy(), None) for b, m in enumerate(stored)]
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
    """Write this rank's missing shards (shard j belongs to rank j % world); existing shards are complete.

    A SIGTERM / SIGINT stops it after the shard being written (`potstill.signals`): it raises `Stopped`, and a rerun
    resumes from the next shard.
    """
    from tqdm.auto import tqdm

    mine = [j for j in range(rank, plan.n_shards, world) if not (plan.out / shard_name(j)).is_file()]
    total = sum(len(plan.shard_range(j)) for j in mine) * plan.codec.seq_len
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="teacher cache", disable=not progress or rank != 0)
    with StopSignals() as stop, bar:
        for n, j in enumerate(mine, 1):
            _write_shard(plan, scorer, j, batch_size, bar)
            if stop.signum and n < len(mine):
                raise stop.stopped(f"after {shard_name(j)} ({n} of {len(mine)} missing shards written to {plan.out})")


def _write_shard(plan: _Plan, scorer: _Scorer, j: int, batch_size: int, bar) -> None:
    indices = plan.shard_range(j)
    stored = plan.stored(indices)
    generator = torch.Generator().manual_seed(plan.settings["seed"] * 1_000_003 + j)
    frames = []
    for start in range(indices.start, indices.stop, batch_size):
        stop = min(start + batch_size, indices.stop)
        batch = {key: getattr(plan.dataset, key)[start:stop] for key in ("input_ids", "attention_mask", "labels")}
        records = scorer.records(batch, stored[start - indices.start : stop - indices.start], generator)
        frames += records
        bar.update((stop - start) * plan.codec.seq_len)
    write_shard_file(plan.out / shard_name(j), frames)


def write_shard_file(path: Path, frames: list[bytes]) -> None:
    """One shard (atomically): MAGIC | uint64 n | uint64 offsets[n + 1] | the n frames."""
    offsets = np.cumsum([0, *map(len, frames)], dtype=np.uint64)
    write_bytes_atomic(path, [MAGIC, struct.pack("<Q", len(frames)), offsets.tobytes(), *frames])


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
    write_json_atomic(plan.out / MANIFEST, {**manifest, "manifest_sha256": manifest_checksum(manifest)})
    return plan.out / MANIFEST


def _distributed():
    """(rank, world, barrier) under torchrun (gloo process group started if needed), else (0, 1, no-op)."""
    import torch.distributed as dist

    if not dist.is_available() or (not dist.is_initialized() and world_size() <= 1):
        return 0, 1, lambda: None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier
