"""The teacher cache for classifiers: a classifier teacher's top-k log-probs per image, in the text cache's format.

An image is stored as a sequence of length 1: the same shards (one zstd frame per image, `Codec` with seq_len 1),
`build.json` / `manifest.json`, resume and checksums as the text cache, so `TeacherCache`, `potstill cache verify`
and `potstill cache info` read it unchanged. What differs is what identifies a build: the teacher's
`module_fingerprint` (not an HF directory), the images' fingerprint (paths, domains, file bytes) and the
preprocessing, all checked by `ImageCache.check` before any target is served.

    build_image_cache(ClassifierTeacher(model), images, "cache/", Preprocess(260), k=1000)
    cache = ImageCache("cache/")
    cache.check(teacher, images, Preprocess(260), temperature=1.0)
    targets = cache.targets([0, 5, 7])   # SparseTargets, ids / logprobs [3, k], tail [3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from potstill.data.images import ImageSet, Preprocess, preprocess_dict
from potstill.errors import UserError
from potstill.losses.sparse import SparseTargets, topk_targets
from potstill.teacher.cache.codec import Codec
from potstill.teacher.cache.format import ENCODINGS, FORMAT, FORMAT_VERSION, shard_name
from potstill.teacher.cache.reader import TeacherCache
from potstill.teacher.cache.writer import VALUES, claim, finalize, write_shard_file
from potstill.teacher.classifier import ClassifierTeacher

KIND = "image-classifier"
_ONE = np.ones(1, dtype=bool)  # the stored-position mask of an image (a sequence of length 1)


@dataclass
class _ImagePlan:
    """What `finalize` needs of a build: out, settings, shards and their stored positions (every image)."""

    out: Path
    settings: dict
    n_images: int
    per_shard: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.per_shard)

    def shard_range(self, j: int) -> range:
        return range(j * self.per_shard, min(self.n_images, (j + 1) * self.per_shard))

    def stored(self, indices: range) -> torch.Tensor:
        return torch.ones(len(indices), 1, dtype=torch.bool)


def build_image_cache(
    teacher: ClassifierTeacher,
    images: ImageSet,
    out: str | Path,
    preprocess: Preprocess,
    *,
    k: int = 64,
    temperature: float = 1.0,
    encoding: str = "compact",
    batch_size: int = 16,
    per_shard: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the classifier teacher once over the images and store its top-k log-probs per image (resumable).

    Args:
        teacher: the frozen classifier teacher.
        images: the images (their order is the cache's index).
        out: cache directory.
        preprocess: the teacher's preprocessing.
        k: classes kept per image, 1 <= k <= C (k = C keeps the whole distribution).
        temperature: softmax temperature of the stored log-probs (the loss must use the same).
        encoding: "compact" or "lossless" (as the text cache).
        batch_size: images per teacher forward.
        per_shard: images per shard (a shard is written atomically; an interrupted build resumes after the last).
        overwrite: replace a cache built with other settings.
        progress: show a progress bar.

    Returns:
        The cache directory (with manifest.json).

    Raises:
        UserError: bad option, or `out` holds another cache (without overwrite).
    """
    from tqdm.auto import tqdm

    if encoding not in ENCODINGS:
        raise UserError(f"image cache: encoding must be one of {ENCODINGS} (got {encoding!r})")
    if batch_size < 1 or per_shard < 1:
        raise UserError(f"image cache: batch_size and per_shard must be >= 1 (got {batch_size}, {per_shard})")
    classes = teacher.logits(images.pixels([0], preprocess)).shape[-1]
    if not 1 <= k <= classes:
        raise UserError(f"image cache: k must be in [1, {classes}] (the teacher's classes), got {k}")
    if temperature <= 0:
        raise UserError(f"image cache: temperature must be > 0, got {temperature}")
    settings = _settings(teacher, images, preprocess, classes, k, temperature, encoding, per_shard)
    out = Path(out)
    if not claim(out, settings, overwrite):
        return out
    plan = _ImagePlan(out, settings, len(images), per_shard)
    codec = Codec("topk", encoding, k, classes, 1)
    todo = [j for j in range(plan.n_shards) if not (out / shard_name(j)).is_file()]
    total = sum(len(plan.shard_range(j)) for j in todo)
    with tqdm(total=total, unit="img", desc="teacher cache", disable=not progress) as bar:
        for j in todo:
            frames = []
            indices = plan.shard_range(j)
            for start in range(indices.start, indices.stop, batch_size):
                batch = list(range(start, min(start + batch_size, indices.stop)))
                top = topk_targets(teacher.logits(images.pixels(batch, preprocess)), k, temperature)
                ids, logprobs, tail = top.ids.numpy(), top.logprobs.numpy(), top.tail.numpy()
                frames += [
                    codec.encode(_ONE, ids[b : b + 1], logprobs[b : b + 1], tail[b : b + 1]) for b in range(len(batch))
                ]
                bar.update(len(batch))
            write_shard_file(out / shard_name(j), frames)
    finalize(plan)
    return out


def _settings(teacher, images, preprocess, classes, k, temperature, encoding, per_shard) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "teacher": {"path": teacher.name, "fingerprint": teacher.fingerprint},
        "tokenizer_fingerprint": None,
        "vocab_size": classes,
        "targets": "topk",
        "k": k,
        "temperature": temperature,
        "encoding": encoding,
        "values": VALUES[encoding],
        "seq_len": 1,
        "positions": "all (one per image)",
        "preprocess": preprocess_dict(preprocess),
        "data": {"images": len(images), "skipped": len(images.skipped), "fingerprint": images.fingerprint()},
        "sequences": len(images),
        "sequences_per_shard": per_shard,
    }


class ImageCache:
    """Read a classifier teacher cache: check it against the run, serve [B, k] targets per image.

    Args:
        path: the cache directory.

    Raises:
        UserError: what `TeacherCache` refuses, or a text (token) cache.
    """

    def __init__(self, path: str | Path):
        self.cache = TeacherCache(path)
        self.manifest = self.cache.manifest
        if self.manifest.get("kind") != KIND:
            raise UserError(f"{path}: a token-level teacher cache, not an image classifier cache")

    def __len__(self) -> int:
        return len(self.cache)

    def check(self, teacher: ClassifierTeacher | str, images: ImageSet, preprocess: Preprocess, temperature: float):
        """Refuse a run whose teacher, images, preprocessing or loss temperature differ from the build.

        Args:
            teacher: the run's teacher (or its fingerprint).
            images: the run's images (same order as the build).
            preprocess: the teacher's preprocessing in this run.
            temperature: the loss temperature.
        """
        where = f"{self.cache.path}: image teacher cache"
        fingerprint = teacher if isinstance(teacher, str) else teacher.fingerprint
        if fingerprint != self.manifest["teacher"]["fingerprint"]:
            raise UserError(f"{where} was built with another teacher ({self.manifest['teacher']['path']}); rebuild it")
        if preprocess_dict(preprocess) != self.manifest["preprocess"]:
            raise UserError(f"{where} was built with preprocessing {self.manifest['preprocess']}, not {preprocess}")
        if images.fingerprint() != self.manifest["data"]["fingerprint"]:
            raise UserError(
                f"{where} was built on other images ({self.manifest['data']['images']} images; paths, domains, bytes "
                "or order differ); use the same image list or rebuild the cache"
            )
        self.cache.check(temperature=temperature)

    def targets(self, indices: Sequence[int]) -> SparseTargets:
        """Sparse targets of images: ids / logprobs [B, k] (most probable first), tail [B], at the cache's T."""
        t = self.cache.targets(indices)
        return SparseTargets(t.ids[:, 0], t.logprobs[:, 0], t.tail[:, 0], temperature=t.temperature)
