"""The id map of a student with a trimmed vocabulary: `potstill_vocab.json` in the student's directory.

`{"teacher_vocab_size": V_teacher, "teacher_ids": [teacher id of student id 0, 1, ...]}`, written by
`potstill student init --trim-vocab` (speech students also record `"teacher_tokenizer"`: the teacher tokenizer's
fingerprint, `id_map_tokenizer`). Read without torch by `id_map_size` (the plan), as a tensor by `load_id_map`.
"""

from __future__ import annotations

import json
from pathlib import Path

from potstill.errors import UserError

ID_MAP_FILE = "potstill_vocab.json"


def _teacher_ids(student_dir: str | Path) -> list[int] | None:
    """The `teacher_ids` of the student's id map, checked; None when it has none."""
    path = Path(student_dir) / ID_MAP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ids, size = data["teacher_ids"], data["teacher_vocab_size"]
        ok = isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < size for i in ids)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: malformed id map ({err}); expected {{'teacher_vocab_size', 'teacher_ids'}}") from None
    if not ok or not ids:
        raise UserError(f"{path}: teacher_ids must be a non-empty list of ids in [0, {size})")
    return ids


def id_map_size(student_dir: str | Path) -> int | None:
    """Rows of the student's id map, or None when it keeps the teacher's vocabulary (no torch import)."""
    ids = _teacher_ids(student_dir)
    return None if ids is None else len(ids)


def load_id_map(student_dir: str | Path):
    """Student id -> teacher id as a [V_student] LongTensor, or None if the student keeps the teacher's vocabulary.

    Raises:
        UserError: `potstill_vocab.json` exists but is malformed.
    """
    ids = _teacher_ids(student_dir)
    if ids is None:
        return None
    import torch

    return torch.tensor(ids, dtype=torch.long)


def id_map_tokenizer(student_dir: str | Path) -> str | None:
    """The fingerprint of the teacher tokenizer the id map was made from, when the map records it."""
    path = Path(student_dir) / ID_MAP_FILE
    if _teacher_ids(student_dir) is None:
        return None
    return json.loads(path.read_text()).get("teacher_tokenizer")
