"""Captions of images from their file names: the words of the folders below the root and of the file's stem.

``/usr/share/openclipart/png/animals/bugs/ladybug_02.png`` under root ``/usr/share/openclipart/png`` ->
``"animals bugs: ladybug"``; an emoji rendered as ``emoji/smiling_face_with_halo.png`` -> ``"emoji: smiling face
with halo"``. Separators (``_ - .``) become spaces, words that contain digits are dropped (numbering, sizes).
Openclipart's names are real but noisy (some are Italian or French, some carry the author's name): they are what
the text teacher embeds.
"""

from __future__ import annotations

import re
from pathlib import Path

from potstill.errors import UserError


def path_caption(path: str | Path, root: str | Path) -> str:
    """The caption of an image file from its folders below `root` and its stem.

    Raises:
        UserError: the path is not under the root, or no word is left.
    """
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        raise UserError(f"{path}: not under the caption root {root}") from None
    words = lambda part: [w for w in re.split(r"[\s_\-.]+", part.lower()) if w and not re.search(r"\d", w)]  # noqa: E731
    folders = [w for part in rel.parts[:-1] for w in words(part)]
    name = words(rel.stem)
    if not name and not folders:
        raise UserError(f"{path}: its name has no word to caption it with")
    return f"{' '.join(folders)}: {' '.join(name)}" if folders else " ".join(name)
