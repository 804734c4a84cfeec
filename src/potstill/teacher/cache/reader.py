"""Reading a teacher cache: `TeacherCache` serves sparse targets per packed sequence and checks the run against
the build; `verify_report` and `info_text` are `potstill cache verify` / `potstill cache info`."""

from __future__ import annotations

import json
import struct
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zstandard

from potstill.errors import UserError
from potstill.fileio import is_temp
from potstill.losses.fused import TeacherHead
from potstill.losses.sparse import SparseTargets
from potstill.teacher.cache.codec import Codec
from potstill.teacher.cache.cross import CrossCodec
from potstill.teacher.cache.format import (
    BUILD,
    FORMAT,
    MAGIC,
    MANIFEST,
    READABLE_VERSIONS,
    manifest_checksum,
    read_json,
    teacher_fingerprint,
    tokenizer_fingerprint,
)


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
        manifest = read_json(self.path / MANIFEST)
        if manifest is None:
            hint = "not a teacher cache (build one with `potstill cache build`)"
            if (self.path / BUILD).is_file():
                hint = "its build was interrupted: rerun the same `potstill cache build` to resume"
            raise UserError(f"{self.path}: no {MANIFEST}; {hint}")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{self.path / MANIFEST}: not a potstill teacher cache manifest")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise UserError(
                f"{self.path / MANIFEST}: cache format version {manifest.get('format_version')!r}, this potstill "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; rebuild it with `potstill cache build "
                "--overwrite`"
            )
        if manifest["format_version"] >= 2 and manifest.get("manifest_sha256") != manifest_checksum(manifest):
            raise UserError(
                f"{self.path / MANIFEST}: checksum mismatch (the manifest was edited or corrupted: its settings no "
                "longer describe the shards); rebuild the cache (`potstill cache build --overwrite`)"
            )
        self.manifest = manifest
        try:
            codec = Codec(
                manifest["targets"], manifest["encoding"], manifest["k"], manifest["vocab_size"], manifest["seq_len"]
            )
            self.codec = CrossCodec(codec) if self.cross else codec
            self._shards = manifest["shards"]
            self._starts = [s["start"] for s in self._shards]
            for shard in self._shards:
                self._check_size(shard)
        except (KeyError, TypeError, ValueError) as err:
            missing = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise UserError(f"{self.path / MANIFEST}: malformed manifest ({missing})") from None
        self._offsets: dict[int, np.ndarray] = {}

    @property
    def cross(self) -> dict | None:
        """A cross-tokenizer cache's teacher-side facts (`teacher.cache.cross`), None for a same-tokenizer one."""
        return self.manifest.get("cross_tokenizer")

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
            if self.cross:
                raise UserError(
                    f"{where} was built for a student with another tokenizer ({self.manifest['student']['path']}, "
                    "cross-tokenizer cache); rebuild it for this student (--student)"
                )
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
        if temperature is not None and self.temperature is not None and abs(temperature - self.temperature) > 1e-6:
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
        if self.cross:  # its records are per teacher token, not per student position
            raise UserError(
                f"{self.path}: a cross-tokenizer cache; a run reads it through `teacher.cache.cross.CrossCache`"
            )
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

    def states(self, indices: Sequence[int]) -> torch.Tensor:
        """The teacher's final hidden states of packed sequences (a `targets: hidden` cache).

        Args:
            indices: B packed-sequence indices.

        Returns:
            [B, L, H] float32 (bf16 values); positions that are not stored (next token not scored) hold zeros.
        """
        seqs = [self._sequence(int(i)) for i in indices]
        out = np.zeros((len(seqs), self.codec.seq_len, self.codec.k), dtype=np.float32)
        for b, (mask, _, values, _) in enumerate(seqs):
            out[b, mask] = values
        return torch.from_numpy(out)

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
                if i - shard["start"] < sample and len(logprobs) and self.codec.targets != "hidden":
                    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
                    kept.append(mass)
                    top1.append(np.exp(logprobs[:, 0].astype(np.float64)))
                    worst = max(worst, float(np.abs(mass + tail - 1).max()))
            self._offsets.pop(j, None)
        if tokens != self.manifest["tokens"]:
            raise UserError(f"{self.path}: shards hold {tokens} tokens, the manifest says {self.manifest['tokens']}")
        size = sum(s["bytes"] for s in self._shards)
        return {
            "format_version": self.manifest["format_version"],
            "leftover_temps": sorted(p.name for p in self.path.iterdir() if is_temp(p.name)),
            "sequences": len(self),
            "tokens": tokens,
            "shards": len(self._shards),
            "bytes": size,
            "bytes_per_token": size / max(tokens, 1),
            "targets": self.manifest["targets"],
            "k": self.codec.k,
            "encoding": self.manifest["encoding"],
            "temperature": self.temperature,
            "cross_tokenizer": self.cross,
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
        return self.read(i, self.codec.decode)

    def read(self, i: int, decode):
        """Sequence i's record, decoded by `decode` (frame bytes -> record; a cross-tokenizer cache has two ways).

        Raises:
            UserError: the record cannot be read or decoded (a corrupted shard).
        """
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
            return decode(frame)
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
    notes = []
    if summary["leftover_temps"]:
        notes.append(
            f"note: {len(summary['leftover_temps'])} temporary file(s) of an interrupted build "
            f"({', '.join(summary['leftover_temps'][:3])}); the next `potstill cache build` of it deletes them"
        )
    if summary["format_version"] < 2:
        notes.append("note: a format version 1 cache: its manifest has no checksum (rebuild to get one)")
    if summary["cross_tokenizer"]:  # the top-k ids are stored at the teacher's 1:1-aligned tokens only
        cross = summary["cross_tokenizer"]
        notes.append(
            f"cross-tokenizer: the teacher's own tokenizer (fingerprint {cross['teacher_tokenizer_fingerprint'][:12]}),"
            f" {cross['shared_tokens']} ids shared with the student's; top-k stored at 1:1-aligned tokens only"
        )
    return "\n".join(
        [
            f"ok: {summary['shards']} shards, {summary['sequences']} sequences, {summary['tokens']} tokens, "
            f"{summary['bytes']} bytes ({summary['bytes_per_token']:.1f} bytes/token)",
            f"targets: {summary['targets']}, k={summary['k']}, encoding={summary['encoding']}, "
            f"T={summary['temperature']}",
            f"fidelity sample ({fid['positions']} positions): mean kept mass {fmt(fid['mean_kept_mass'])}, mean top-1 "
            f"prob {fmt(fid['mean_top1_prob'])}, max |sum p + tail - 1| {fid['max_normalization_error']:.2e}",
            *notes,
        ]
    )


def info_text(path: str | Path) -> str:
    """`potstill cache info`: the manifest as indented JSON (after the reader's checks)."""
    return json.dumps(TeacherCache(path).manifest, indent=2)


class HeadedCache:
    """A `targets: hidden` cache with the teacher's head: `targets(indices)` is the exact teacher at any temperature.

    The head (the only part of the teacher kept in memory) turns each stored final hidden state into the teacher's
    full logits, in the fused loss chunk by chunk (as with an online teacher), so nothing is truncated to a top-k.

    Args:
        cache: the hidden-state `TeacherCache`.
        weight: [V_student, H] head rows (the student's vocabulary: `W[id_map]` for a trimmed student).
        bias: [V_student] or None.
        softcap: the teacher's final logit softcapping, or None.
    """

    def __init__(self, cache: TeacherCache, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
        if weight.shape[1] != cache.codec.k:
            raise UserError(
                f"{cache.path}: the cache holds hidden states of width {cache.codec.k}, the teacher's head reads"
                f" {weight.shape[1]}; use the teacher it was built with (model.teacher)"
            )
        self.cache, self.weight, self.bias, self.softcap = cache, weight, bias, softcap

    def targets(self, indices: Sequence[int]) -> TeacherHead:
        """TeacherHead with hidden [B, L, H] float32 (zeros where nothing is stored) and the head."""
        return TeacherHead(self.cache.states(indices).to(self.weight.dtype), self.weight, self.bias, self.softcap)

    def to(self, device) -> HeadedCache:
        """Move the head to the training device (once; the states follow per batch)."""
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self
