"""Atomic file writes: every file potstill writes appears whole or not at all.

The text goes to a temporary name in the same directory (same filesystem), then `os.replace` renames it
over the target; a crash or a full disk leaves either the old file or none, never a partial one.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (plus a final newline) to `path` atomically; return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
