"""Images for classifier distillation: a folder or a JSONL of image paths, checked, then decoded on demand.

Sources (`scan_images`):

- a folder: every image file under it (``.png .jpg .jpeg .gif .bmp .webp``, recursively); the domain of a file is
  its first folder below the root (``/usr/share/openclipart/png/animals/x/cat.png`` -> ``animals``), ``default``
  for files directly in the root;
- a ``.jsonl`` file: one ``{"image": "path", "domain": "name"}`` per line (domain optional; a relative path is
  relative to the JSONL file's folder).

Every listed image is fully decoded once by `scan_images`. One that does not decode (or is larger than
`max_pixels`) is named and skipped (counted in
`ImageSet.skipped` and in `summary()`), or refused with one line when `on_bad="error"`. An empty folder is a one-line
error. Pixels are produced on demand by `ImageSet.pixels` with a `Preprocess` (resize the shorter side, center crop,
normalize with the model's mean / std); transparent images are laid on a white background first (clipart and emoji
are drawn on transparency, which would otherwise read as black). Needs Pillow (`pip install potstill[vision]`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from potstill.data.sources import DEFAULT_DOMAIN
from potstill.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
MAX_PIXELS = 25_000_000  # larger images are skipped: decoding one 168-Mpixel clipart PNG takes about a minute
ON_BAD = ("skip", "error")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise UserError("images need Pillow: pip install 'potstill[vision]'") from None
    return Image


@dataclass(frozen=True)
class ImageRecord:
    """One image file and its domain."""

    path: Path
    domain: str = DEFAULT_DOMAIN


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: resize the shorter side to `size / crop`, center crop `size`, normalize.

    Attributes:
        size: side of the square input, in pixels.
        mean: per-channel mean (RGB, on the 0..1 scale).
        std: per-channel standard deviation (RGB, 0..1 scale).
        crop: fraction of the resized image kept by the center crop (1.0: resize the shorter side to `size`).
    """

    size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: float = 1.0

    def __post_init__(self):
        if self.size < 1 or not 0 < self.crop <= 1 or min(self.std) <= 0:
            raise UserError(f"preprocess: size must be >= 1, crop in (0, 1], std > 0 (got {self})")


@dataclass
class ImageSet:
    """Images that decoded, in a fixed order (index i is what a teacher cache stores at sequence i).

    Attributes:
        records: the usable images.
        skipped: (path, reason) of images that did not decode.
    """

    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def domains(self) -> list[str]:
        """Domain of each image, in order."""
        return [r.domain for r in self.records]

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at `indices` (skipped ones stay reported)."""
        return ImageSet([self.records[i] for i in indices], list(self.skipped))

    def fingerprint(self) -> str:
        """sha256 of each image's path, domain and file bytes, in order: what a teacher cache was built on."""
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.path.resolve()}\0{r.domain}\0".encode())
            digest.update(hashlib.sha256(r.path.read_bytes()).digest())
        return digest.hexdigest()

    def summary(self) -> str:
        """One line: counts per domain and the skipped images (the first one named)."""
        counts: dict[str, int] = {}
        for d in self.domains:
            counts[d] = counts.get(d, 0) + 1
        text = f"{len(self)} images in {len(counts)} domains ({', '.join(f'{d}: {n}' for d, n in counts.items())})"
        if self.skipped:
            path, why = self.skipped[0]
            text += f"; {len(self.skipped)} skipped (do not decode or too large, e.g. {path}: {why})"
        return text

    def pixels(self, indices: Sequence[int], pre: Preprocess) -> torch.Tensor:
        """Preprocessed images.

        Args:
            indices: B image indices.
            pre: the model's preprocessing.

        Returns:
            [B, 3, pre.size, pre.size] float32, normalized.
        """
        mean = torch.tensor(pre.mean).view(3, 1, 1)
        std = torch.tensor(pre.std).view(3, 1, 1)
        out = torch.empty(len(indices), 3, pre.size, pre.size)
        for b, i in enumerate(indices):
            out[b] = (to_array(open_rgb(self.records[i].path), pre).permute(2, 0, 1).float() / 255 - mean) / std
        return out


def open_rgb(path: Path):
    """Decode an image file into an RGB Pillow image (transparency composited on white)."""
    image = _pil()
    with image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def to_array(img, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side to round(size / crop) (bicubic), center crop size x size: [size, size, 3] uint8."""
    image = _pil()
    width, height = img.size
    short = max(pre.size, round(pre.size / pre.crop))
    scale = short / min(width, height)
    img = img.resize((max(short, round(width * scale)), max(short, round(height * scale))), image.BICUBIC)
    left, top = (img.size[0] - pre.size) // 2, (img.size[1] - pre.size) // 2
    img = img.crop((left, top, left + pre.size, top + pre.size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def scan_images(
    sources: str | Path | Sequence[str | Path],
    *,
    on_bad: str = "skip",
    per_domain: int | None = None,
    seed: int = 0,
    max_pixels: int | None = MAX_PIXELS,
) -> ImageSet:
    """List the images of folders / JSONL files and check that each decodes.

    Args:
        sources: folders and / or .jsonl files.
        on_bad: "skip" (name and count images that do not decode) or "error" (refuse the first one).
        per_domain: keep at most this many images per domain (a seeded choice, made before decoding).
        seed: seed of that choice.
        max_pixels: images with more pixels (width x height, read from the header) count as bad ones
            (None: no limit below Pillow's own decompression-bomb limit).

    Returns:
        The ImageSet, ordered by domain (first seen) then by the seeded choice.

    Raises:
        UserError: a missing source, an empty folder, a bad JSONL line, a bad `on_bad`, or (on_bad="error") an image
            that does not decode.
    """
    if on_bad not in ON_BAD:
        raise UserError(f"images: on_bad must be one of {ON_BAD} (got {on_bad!r})")
    paths = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not paths:
        raise UserError("images: no source given (a folder or a .jsonl file of image paths)")
    records = [r for source in paths for r in _list(Path(source))]
    if per_domain is not None:
        records = _choose(records, per_domain, seed)
    good, skipped = [], []
    for r in records:
        try:
            _check(r.path, max_pixels)
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
            why = (str(err).splitlines() or [type(err).__name__])[0]
            if on_bad == "error":
                raise UserError(
                    f"{r.path}: cannot decode the image ({why}); fix or remove it, or skip bad images"
                ) from None
            skipped.append((r.path, why))
            continue
        good.append(r)
    if not good:
        raise UserError(f"images: none of the {len(records)} images in {', '.join(map(str, paths))} decodes")
    return ImageSet(good, skipped)


def _check(path: Path, max_pixels: int | None) -> None:
    """Raise if the image is larger than max_pixels or does not decode."""
    with warnings.catch_warnings():  # the size is checked here, against max_pixels: Pillow's warning adds nothing
        warnings.simplefilter("ignore", _pil().DecompressionBombWarning)
        with _pil().open(path) as img:
            width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width} x {height} pixels is more than max_pixels={max_pixels}")
    open_rgb(path)


def _list(source: Path) -> list[ImageRecord]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{source}: no image files ({' '.join(IMAGE_SUFFIXES)}) in this folder")
        domain = lambda p: p.relative_to(source).parts[0] if len(p.relative_to(source).parts) > 1 else DEFAULT_DOMAIN  # noqa: E731
        return [ImageRecord(p, domain(p)) for p in files]
    if source.suffix == ".jsonl" and source.is_file():
        return _read_jsonl(source)
    raise UserError(f"{source}: not a folder of images or a .jsonl file of image paths")


def _read_jsonl(path: Path) -> list[ImageRecord]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise UserError(f'{path}:{n}: expected {{"image": "path", "domain": "name"}} (domain optional)')
        image = Path(obj["image"]) if Path(obj["image"]).is_absolute() else path.parent / obj["image"]
        records.append(ImageRecord(image, str(obj.get("domain", DEFAULT_DOMAIN))))
    if not records:
        raise UserError(f"{path}: no image records")
    return records


def _choose(records: list[ImageRecord], per_domain: int, seed: int) -> list[ImageRecord]:
    """At most `per_domain` records per domain, chosen by a seeded hash of the path (stable across runs)."""
    by_domain: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_domain.setdefault(r.domain, []).append(r)
    key = lambda r: hashlib.sha256(f"{seed}:{r.path}".encode()).hexdigest()  # noqa: E731
    return [r for rs in by_domain.values() for r in sorted(rs, key=key)[:per_domain]]


def preprocess_dict(pre: Preprocess) -> dict:
    """The preprocessing as plain JSON values (part of a cache's build settings)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(pre).items()}
