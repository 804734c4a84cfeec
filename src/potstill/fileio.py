"""Atomic file writes: every file or directory potstill writes appears whole or not at all.

The content goes to a temporary name in the same directory (same filesystem), then `os.replace` renames it
over the target; a crash or a full disk leaves either the old file or none, never a partial one. There is one
temporary-name pattern, `.NAME.tmp-PID-TID` (`temp_path`), so a directory check can tell a leftover of ours
(`is_temp`) from a user's file, and `remove_stale_temps` can delete the leftovers of processes that are gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from potstill.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<tid>\d+)$")


def temp_path(path: str | Path) -> Path:
    """The temporary name of `path` for this process and thread: `DIR/.NAME.tmp-PID-TID`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def is_temp(name: str) -> bool:
    """Whether a file or directory name is one of `temp_path`'s."""
    return _TEMP.match(name) is not None


def remove_stale_temps(folder: str | Path) -> None:
    """Delete the temporary files and directories in `folder` whose writing process is gone (crashed or killed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is not None and not _alive(int(match["pid"])):
            _remove(entry)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (a file, or a directory to fill); rename it on success.

    A directory replaces an existing `path` whole (the old one is moved aside first, then deleted). On an
    exception the temporary path is removed and `path` is untouched.

    Raises:
        UserError: the disk filled up (nothing is left behind; rerunning the command resumes or redoes it).
    """
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = temp_path(path.with_name(path.name + ".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as err:
        problem = disk_problem(err, path)
        if problem is not None:
            raise UserError(problem) from None
        raise
    finally:
        _remove(tmp)


_DISK_ERRORS = {
    errno.ENOSPC: "out of disk space; free some and rerun the same command (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free some and rerun the same command (finished work is kept)",
    errno.EACCES: "permission denied; choose an output you can write to",
    errno.EPERM: "operation not permitted; choose an output you can write to",
    errno.EROFS: "read-only file system; choose an output you can write to",
}


FULL_BELOW = 16 << 20  # bytes free under which a failed write is taken for a full disk


def disk_problem(err: BaseException, path: str | Path | None = None) -> str | None:
    """The one-line message of an error that is the user's disk or permissions (None for any other error).

    An OSError says so by its errno. Libraries that write through their own code (torch.save, safetensors) raise
    RuntimeError-like errors without one; for those, a file system at `path` with under 16 MiB free is taken as
    the cause.

    Args:
        err: the error.
        path: the file being written (default: the error's own file name).
    """
    reason = _DISK_ERRORS.get(getattr(err, "errno", None))
    if reason is None and path is not None and not isinstance(err, OSError):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if shutil.disk_usage(folder).free < FULL_BELOW:
            reason = _DISK_ERRORS[errno.ENOSPC]
    if reason is None:
        return None
    where = path if path is not None else getattr(err, "filename", None)
    return f"{where}: {reason}" if where is not None else reason


def write_bytes_atomic(path: str | Path, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` one after the other to `path` atomically (fsync'ed before the rename); return the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (plus a final newline) to `path` atomically; return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_writable(path: str | Path) -> None:
    """Fail before long work when `path` (a file or directory a command will write) cannot be created.

    A probe file is created and deleted in the nearest existing folder on the way to `path`; no folder is made.

    Raises:
        UserError: read-only file system, no permission, or a full disk (naming `path`).
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = temp_path(folder / "potstill-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        problem = disk_problem(err, path)
        if problem is None:
            raise
        raise UserError(problem) from None


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The content of a user's file; one-line errors naming it (missing, a directory, no permission)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a user's file (config, template, ...); one-line errors naming it.

    Args:
        path: the file.
        what: what the file is, for the messages ("config file", "template file").

    Raises:
        UserError: the file is missing or unreadable, or is not UTF-8 (naming the first bad byte's offset).
    """
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = f"byte {data[err.start]:#04x} at offset {err.start}"
        raise UserError(f"{path}: {what} is not UTF-8 text ({bad})") from None


def jsonl_objects(path: str | Path, what: str = "file") -> Iterator[tuple[int, Any]]:
    """Each non-blank line of a JSON Lines file, parsed: (line number, value); the one JSONL reader of potstill.

    Lines end at b"\\n" only: U+2028, U+2029 and the other Unicode line breaks that JSON allows raw inside a
    string stay in their line (`str.splitlines` would cut the record there).

    Args:
        path: the file.
        what: what the file is, for the messages ("data file", "input file").

    Raises:
        UserError: the file is missing or unreadable; a line is not UTF-8 or not JSON (naming `file:line`).
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the generator may stop early
    except FileNotFoundError:
        raise UserError(f"{path}: {what} does not exist") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{number}: not valid UTF-8 (byte {raw[err.start]:#04x})") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
