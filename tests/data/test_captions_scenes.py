"""Captions from file names; synthetic scenes: exact captions and answers, the word-level tokenizer, labels."""

from __future__ import annotations

import random

import pytest
import torch

from potstill.data.captions import path_caption
from potstill.data.scenes import (
    COLOURS,
    Shape,
    caption,
    draw_scene,
    encode_example,
    make_scenes,
    questions,
    scene_tokenizer,
)
from potstill.errors import UserError


def test_path_caption():
    root = "/usr/share/openclipart/png"
    assert path_caption(f"{root}/animals/bugs/ladybug_02.png", root) == "animals bugs: ladybug"
    assert path_caption("/x/emoji/smiling_face_with_halo.png", "/x") == "emoji: smiling face with halo"
    assert path_caption("/x/red-car.v2.png", "/x") == "red car"
    with pytest.raises(UserError, match="not under"):
        path_caption("/y/a.png", "/x")
    with pytest.raises(UserError, match="no word"):
        path_caption("/x/0001.png", "/x")


SCENE = [Shape("circle", "red", (0, 0)), Shape("circle", "red", (1, 2)), Shape("square", "blue", (2, 1))]


def test_caption_counts_in_a_fixed_order():
    assert caption(SCENE) == "two red circles and one blue square"
    assert caption(SCENE[::-1]) == caption(SCENE)


def test_every_answer_is_true_of_the_scene():
    rng = random.Random(0)
    for q, a in questions(SCENE, rng, count=50):  # every applicable question
        if q == "how many circles ?":
            assert a == "two"
        elif q == "how many blue objects ?":
            assert a == "one"
        elif q == "what colour is the square ?":
            assert a == "blue"
        elif q == "where is the blue square ?":
            assert a == "bottom center"
        elif q.startswith("is there a"):
            colour, kind = q.split()[3:5]
            assert a == ("yes" if any(o.colour == colour and o.kind == kind for o in SCENE) else "no")
    asked = {q for q, _ in questions(SCENE, rng, count=50)}
    assert "what colour is the circle ?" not in asked  # two circles: ambiguous, never asked


def test_drawn_colours_are_in_their_cells():
    img = draw_scene(SCENE, size=63)
    assert img.getpixel((10, 10)) == COLOURS["red"]  # centre of cell (0, 0)
    assert img.getpixel((31, 52)) == COLOURS["blue"]  # centre of cell (2, 1)
    assert img.getpixel((52, 10)) == (255, 255, 255)  # empty cell


def test_examples_tokenize_without_unknown_words_and_score_only_the_answer():
    pixels, examples = make_scenes(20, seed=3)
    assert pixels.shape == (20, 3, 64, 64) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert {e.task for e in examples} == {"caption", "vqa"}
    tok = scene_tokenizer()
    unk = tok.get_vocab()["<unk>"]
    for e in examples:
        ids, labels = encode_example(tok, e)
        assert unk not in ids
        scored = [t for t in labels if t != -100]
        assert tok.decode(scored[:-1]) == e.answer and scored[-1] == tok.get_vocab()["<eos>"]
        assert len(ids) == len(labels)
    again = make_scenes(20, seed=3)
    assert torch.equal(again[0], pixels) and again[1] == examples
