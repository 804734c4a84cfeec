"""Where a student came from: `potstill student init` writes `potstill_student.json` into the student directory.

It records the teacher, its layer count and the teacher layers the student's layers were copied from
(`kept_layers`, ascending: student layer i = teacher layer kept_layers[i]), besides the selection's measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

from potstill.errors import UserError

STUDENT_FILE = "potstill_student.json"


def kept_layers(student_dir: str | Path) -> tuple[list[int], int] | None:
    """(teacher layer of each student layer, the teacher's layer count) of a pruned student, or None.

    Raises:
        UserError: the file exists but is not the JSON object `potstill student init` writes.
    """
    path = Path(student_dir) / STUDENT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return [int(i) for i in info["kept_layers"]], int(info["teacher_layers"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a readable student record (kept_layers, teacher_layers): {err}") from None
