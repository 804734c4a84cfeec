"""Captioning + VQA KD: a teacher trained here on synthetic scenes, distilled into a smaller student via a transfer set.

Scenes drawn with Pillow (`potstill.data.scenes`: 1-4 coloured shapes on a 3 x 3 grid) come with an exact caption
("two red circles and one blue square") and questions with exact answers ("how many circles ?" -> "two"). One
`TinyCaptioner` (conv encoder + transformer decoder, word-level tokenizer shared by both models) answers both tasks
from a prompt. The recipe is `potstill.vision.caption` (also `potstill vision caption`): the teacher is trained on
labeled scenes (CE); students of one size and budget: ce (labeled scenes only), pseudo (+ a transfer set of
unlabeled scenes with the teacher's greedy answers as hard labels), kd (the same examples with token-level KD on the
teacher's logits: seq-KD + token KD), kd_labeled (KD on the labeled scenes only). Held-out scenes of another seed;
report.json, report.md and grid.png in --work; the teacher is saved there and reused.

    python benchmarks/vision_caption.py --work /work/runs/vision/caption-transfer --arms ce pseudo kd kd_labeled
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from vision_kd import run_main

from potstill.config.base import validate
from potstill.vision.caption import CaptionRecipe, run_caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-caption"))
    for name, info in CaptionRecipe.model_fields.items():
        option, default = "--" + name.replace("_", "-"), info.default
        if isinstance(default, tuple):
            parser.add_argument(option, nargs="+", type=type(default[0]), default=list(default))
        else:
            parser.add_argument(option, type=str if default is None else type(default), default=default)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = validate({name: getattr(args, name) for name in CaptionRecipe.model_fields}, CaptionRecipe)
    run_caption(args.work, recipe)
    print((args.work / "report.md").read_text())


if __name__ == "__main__":
    run_main(main)
