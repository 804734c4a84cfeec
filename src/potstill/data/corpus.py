"""A real, multi-domain text corpus that needs no download: text shipped with every Python installation.

Three domains, all read from the running interpreter's standard library:

- `code`: the standard library's `.py` source files (no tests, no site-packages, no generated codec
  tables, no `pydoc_data`, whose text is the `docs` domain);
- `docstrings`: the module/class/function docstrings of those same files, extracted with `ast` (English
  prose about APIs), one document per file;
- `docs`: the language reference topics that `help()` shows (`pydoc_data.topics.topics`), one document
  per topic.

Split: a document goes to held-out when the hash of (seed, its source key) falls below `heldout_frac`.
The key is the file's path for `code` and `docstrings`, so a file's code and its docstrings always land
in the same split (no held-out text is ever seen in training, in any domain). Each split is then capped
per domain, taking documents in hash order, so sizes are bounded and the result is deterministic.
`build_corpus` writes `train.jsonl` / `heldout.jsonl` (`{"text", "domain"}` per line) atomically.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from potstill.fileio import write_text_atomic

DOMAINS = ("code", "docstrings", "docs")
# Directories of the standard library that are not representative source: tests, third-party code,
# generated codec tables, and the help topics (already the `docs` domain).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)
_MAX_FILE_BYTES = 200_000  # larger stdlib files are generated tables (unicode data, opcodes), not prose or code


@dataclass(frozen=True)
class Document:
    """One source document: `key` decides its split (shared by a file's code and its docstrings)."""

    domain: str
    key: str
    text: str
    part: int = 0  # index of this piece when a long document is cut into pieces


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files that the corpus reads, sorted (deterministic order).

    Args:
        root: the stdlib directory (default: this interpreter's).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.stat().st_size <= _MAX_FILE_BYTES:
            files.append(path)
    return sorted(files)


def file_docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of a Python source, cleaned (dedented), in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old stdlib docstrings
        tree = ast.parse(source)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    # ast.walk is breadth-first; sort by line so a document reads in source order (the module has no lineno).
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
    docs = (ast.get_docstring(node, clean=True) for node in nodes)
    return [doc for doc in docs if doc and doc.strip()]


def iter_documents(root: Path | None = None) -> Iterator[Document]:
    """Every document of every domain (files that do not read or parse are skipped)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        key = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            docstrings = file_docstrings(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if source.strip():
            yield Document("code", key, source)
        if docstrings:
            yield Document("docstrings", key, "\n\n".join(docstrings) + "\n")
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document("docs", f"topic:{name}", inspect.cleandoc(topics[name]) + "\n")


def split_score(seed: int, key: str) -> float:
    """A number in [0, 1) from (seed, key): the split and the order in which documents fill a cap."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: list[Document], seed: int, heldout_frac: float, train_bytes: int, heldout_bytes: int, doc_bytes: int
) -> dict[str, list[Document]]:
    """Assign documents to "train" / "heldout" by key hash, then cap each split per domain (UTF-8 bytes).

    Each document is first cut into pieces of at most `doc_bytes` (whole lines); pieces fill a cap in
    the hash order of (key, piece), so a cap holds pieces of many sources rather than a few long files.
    The last piece is cut to fit.

    Returns:
        {"train": [...], "heldout": [...]}, each grouped by domain in `DOMAINS` order.
    """
    caps = {"train": train_bytes, "heldout": heldout_bytes}
    splits: dict[str, list[Document]] = {"train": [], "heldout": []}
    for domain in DOMAINS:
        pieces = [p for d in docs if d.domain == domain for p in _pieces(d, doc_bytes)]
        pieces.sort(key=lambda p: split_score(seed, f"{p.key}#{p.part}"))
        for split in splits:
            held = split == "heldout"
            chosen = [p for p in pieces if (split_score(seed, p.key) < heldout_frac) == held]
            splits[split].extend(_fill(chosen, caps[split]))
    return splits


def _pieces(doc: Document, max_bytes: int) -> list[Document]:
    """`doc` cut at line boundaries into pieces of at most `max_bytes` (a longer single line is its own piece)."""
    pieces, lines, used = [], [], 0
    for line in doc.text.splitlines(keepends=True):
        size = len(line.encode())
        if lines and used + size > max_bytes:
            pieces.append("".join(lines))
            lines, used = [], 0
        lines.append(line)
        used += size
    if lines:
        pieces.append("".join(lines))
    return [Document(doc.domain, doc.key, text, i) for i, text in enumerate(pieces) if text.strip()]


def _fill(docs: list[Document], cap: int) -> list[Document]:
    out, used = [], 0
    for doc in docs:
        size = len(doc.text.encode())
        if used + size > cap:
            cut = _cut_lines(doc.text, cap - used)
            if cut.strip():
                out.append(Document(doc.domain, doc.key, cut, doc.part))
            break
        out.append(doc)
        used += size
    return out


def _cut_lines(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines of `text` within `max_bytes` UTF-8 bytes."""
    kept, used = [], 0
    for line in text.splitlines(keepends=True):
        used += len(line.encode())
        if used > max_bytes:
            break
        kept.append(line)
    return "".join(kept)


def build_corpus(
    out_dir: str | Path,
    seed: int = 0,
    heldout_frac: float = 0.1,
    train_bytes: int = 600_000,
    heldout_bytes: int = 60_000,
    doc_bytes: int = 8_000,
    root: str | Path | None = None,
) -> dict:
    """Write `out_dir/train.jsonl`, `out_dir/heldout.jsonl` and `out_dir/corpus.json` (stats, written last).

    Args:
        out_dir: directory to write into (created).
        seed: decides the split and which documents fill each cap.
        heldout_frac: fraction of documents (by key) reserved for held-out.
        train_bytes: cap on training text per domain (UTF-8 bytes).
        heldout_bytes: cap on held-out text per domain (UTF-8 bytes).
        doc_bytes: documents are cut into pieces of this size (whole lines): more sources per domain.
        root: stdlib directory to read (default: this interpreter's).

    Returns:
        The stats written to `corpus.json`: {"seed", "files", "domains": {domain: {split: {"docs", "bytes"}}}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = split_documents(list(iter_documents(root)), seed, heldout_frac, train_bytes, heldout_bytes, doc_bytes)
    stats: dict = {"seed": seed, "heldout_frac": heldout_frac, "files": {}, "domains": {}}
    for split, docs in splits.items():
        path = out / f"{split}.jsonl"
        _write_jsonl(path, ({"text": d.text, "domain": d.domain} for d in docs))
        stats["files"][split] = path.name
        for d in docs:
            entry = stats["domains"].setdefault(d.domain, {}).setdefault(split, {"docs": 0, "bytes": 0})
            entry["docs"] += 1
            entry["bytes"] += len(d.text.encode())
    write_text_atomic(out / "corpus.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _write_jsonl(path: Path, rows: Iterator[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
