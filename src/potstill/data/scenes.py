"""Synthetic scenes drawn with Pillow, with exact captions and questions with exact answers (captioning / VQA data).

A scene is 1-4 shapes (circle, square, triangle) in four colours, each in its own cell of a 3 x 3 grid (jittered
inside the cell), on white. From the scene alone, without a model:

- caption: the objects counted by (colour, shape), in a fixed order: "two red circles and one blue square";
- questions: "how many circles ?" -> "two", "how many red objects ?" -> "one", "is there a green square ?" ->
  "no", "what colour is the triangle ?" -> "blue" (asked when exactly one triangle), "where is the red circle ?" ->
  "top left" (when exactly one red circle).

Text is tokenized by a word-level `tokenizers` tokenizer over this grammar's closed vocabulary (`scene_tokenizer`);
a decoder sequence is `<bos> prompt : answer <eos>` and only the answer and `<eos>` are scored (`encode_example`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from potstill.losses import IGNORE_INDEX

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
NUMBERS = ("zero", "one", "two", "three", "four")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
WORDS = (
    *SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *NUMBERS, *ROWS, *COLS,
    "and", "how", "many", "objects", "is", "there", "a", "what", "colour", "the", "where", "yes", "no", "?", ":",
    "caption", "answer",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One object: its shape, colour and grid cell (row, column)."""

    kind: str
    colour: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Example:
    """One (image, prompt, answer) triple; the image is the scene at `scene` of the list it belongs to."""

    scene: int
    task: str  # "caption" or "vqa"
    prompt: str
    answer: str


def random_scene(rng: random.Random, max_objects: int = 4) -> list[Shape]:
    """1..max_objects shapes in distinct cells, uniformly random kinds and colours."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, max_objects))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), cell) for cell in sorted(cells)]


def draw_scene(scene: list[Shape], size: int = 64, rng: random.Random | None = None):
    """The scene as an RGB Pillow image of size x size (object centres jittered by `rng` when given)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell, radius = size / 3, size / 9
    for obj in scene:
        jitter = (rng.uniform(-0.12, 0.12) * cell, rng.uniform(-0.12, 0.12) * cell) if rng else (0.0, 0.0)
        x, y = (obj.cell[1] + 0.5) * cell + jitter[0], (obj.cell[0] + 0.5) * cell + jitter[1]
        box = (x - radius, y - radius, x + radius, y + radius)
        colour = COLOURS[obj.colour]
        if obj.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)
    return img


def caption(scene: list[Shape]) -> str:
    """Counts by (colour, shape) in the fixed order of COLOURS then SHAPES: "two red circles and one blue square"."""
    parts = []
    for colour in COLOURS:
        for kind in SHAPES:
            n = sum(o.colour == colour and o.kind == kind for o in scene)
            if n:
                parts.append(f"{NUMBERS[n]} {colour} {kind}{'s' if n > 1 else ''}")
    return " and ".join(parts)


def questions(scene: list[Shape], rng: random.Random, count: int = 3) -> list[tuple[str, str]]:
    """`count` questions about the scene with their exact answers, a seeded choice among every kind that applies."""
    pool = [(f"how many {kind}s ?", NUMBERS[sum(o.kind == kind for o in scene)]) for kind in SHAPES]
    pool += [(f"how many {c} objects ?", NUMBERS[sum(o.colour == c for o in scene)]) for c in COLOURS]
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    present = any(o.colour == colour and o.kind == kind for o in scene)
    pool.append((f"is there a {colour} {kind} ?", "yes" if present else "no"))
    pool += [(f"what colour is the {o.kind} ?", o.colour) for o in scene if sum(p.kind == o.kind for p in scene) == 1]
    pool += [
        (f"where is the {o.colour} {o.kind} ?", f"{ROWS[o.cell[0]]} {COLS[o.cell[1]]}")
        for o in scene
        if sum(p.kind == o.kind and p.colour == o.colour for p in scene) == 1
    ]
    return rng.sample(pool, min(count, len(pool)))


def make_scenes(n: int, seed: int, size: int = 64, questions_per_scene: int = 3) -> tuple[torch.Tensor, list[Example]]:
    """n random scenes and their examples (one caption + `questions_per_scene` questions each).

    Returns:
        (pixels [n, 3, size, size] float32 in [0, 1], examples).
    """
    rng = random.Random(seed)
    pixels = torch.empty(n, 3, size, size)
    examples = []
    for i in range(n):
        scene = random_scene(rng)
        img = draw_scene(scene, size, rng)
        pixels[i] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        examples.append(Example(i, "caption", "caption :", caption(scene)))
        examples += [Example(i, "vqa", f"{q} answer :", a) for q, a in questions(scene, rng, questions_per_scene)]
    return pixels / 255, examples


def scene_tokenizer():
    """A word-level `tokenizers.Tokenizer` over the grammar's closed vocabulary (whitespace-split words)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate((*SPECIALS, *WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """`<bos> prompt answer <eos>` ids and HF-style unshifted labels (-100 on `<bos>` and the prompt).

    Returns:
        (ids, labels), both of length 1 + len(prompt) + len(answer) + 1.
    """
    vocab = tokenizer.get_vocab()
    prompt = tokenizer.encode(example.prompt).ids
    answer = tokenizer.encode(example.answer).ids
    ids = [vocab["<bos>"], *prompt, *answer, vocab["<eos>"]]
    return ids, [IGNORE_INDEX] * (1 + len(prompt)) + ids[1 + len(prompt) :]


def pad_batch(seqs: list[list[int]], value: int) -> torch.Tensor:
    """[B, T_max] long tensor, right-padded with `value`."""
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s)
    return out
