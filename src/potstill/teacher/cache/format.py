"""The teacher cache's names and fingerprints: what a cache directory holds and how a build is identified.

Fingerprints (sha256) say what a cache was built from: the packed data (`dataset_fingerprint`), the tokenizer
(`tokenizer_fingerprint`), the teacher's config and weights (`teacher_fingerprint`, weight hashes cached in
`cache_dir()/file-hashes.json` by size and mtime).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import get_args

import torch

from potstill.config import CacheEncoding, CacheTargets
from potstill.errors import UserError
from potstill.fileio import write_json_atomic

FORMAT = "potstill-teacher-cache"
FORMAT_VERSION = 2  # 2: manifest.json carries `manifest_sha256`, a checksum over its own fields
CROSS_FORMAT_VERSION = 3  # a cross-tokenizer cache (teacher.cache.cross): readers of versions 1-2 refuse it
READABLE_VERSIONS = (1, 2, 3)  # version 1 caches (no manifest checksum) are still read; 3: cross-tokenizer
MANIFEST = "manifest.json"
BUILD = "build.json"
MAGIC = b"PSTSHRD1"
TARGETS = get_args(CacheTargets)
ENCODINGS = get_args(CacheEncoding)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # part of the tokenizer fingerprint


def shard_name(j: int) -> str:
    """File name of shard j."""
    return f"shard-{j:05d}.bin"


def read_json(path: Path) -> dict | None:
    """A JSON file of the cache, or None when it does not exist.

    Raises:
        UserError: the file exists but cannot be read or parsed.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def manifest_checksum(manifest: dict) -> str:
    """sha256 of a manifest's fields (all but `manifest_sha256` itself), key order and spacing normalized."""
    fields = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of a PackedDataset's `input_ids` and `labels` ([N, L] each, as int64): what the cache was built on."""
    digest = hashlib.sha256()
    for tensor in (dataset.input_ids, dataset.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    spec = {"vocab": sorted(tokenizer.get_vocab().items()), **{s: getattr(tokenizer, s, None) for s in SPECIAL_TOKENS}}
    return hashlib.sha256(json.dumps(spec, ensure_ascii=False).encode()).hexdigest()


def teacher_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the teacher's config.json and the sha256 of each weights file (hashes cached by size + mtime)."""
    from potstill.models.load import cache_dir, file_sha256

    root = Path(model_dir)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    known_path = cache_dir() / "file-hashes.json"
    known = read_json(known_path) or {}
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


def _try_write_json(path: Path, obj: dict) -> None:
    """Best effort (a cache of hashes): a read-only home must not stop a build."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, obj)
    except (OSError, UserError):
        pass
