"""Cross-modal embedding KD: all-MiniLM-L6-v2 (text) teaches an image student where to place each image.

Images: openclipart (per category) and Noto color emoji; each image's caption comes from its file name
(`potstill.data.captions`), e.g. "animals bugs: ladybug", "emoji: smiling face with halo". The teacher embeds the
captions (mean-pooled, unit vectors; `potstill.teacher.text_encoder`). The student is Lite0's frozen ImageNet
backbone (pooled 1280-d features, computed once) + a trained MLP head 1280 -> 512 -> 384. Arms, same head, steps,
batch, learning rate and seeds (the seed sets the head's initial weights and the batch order):

- cosine / mse / contrastive: the head is trained to the teacher's embedding of the image's caption
  (`potstill.losses.embedding`);
- labels: the same head + a linear layer to the image's category (its domain), CE on the label alone
  (`train.classifier.fit_classifier`, alpha = 0). It ranks a caption by log p(caption's category | image).

Held-out images (a seeded 20% of every domain): zero-shot image -> caption retrieval among the unique captions of the
held-out images (never seen in training), recall@1 / recall@5 (ties counted at their expected value,
`potstill.eval.retrieval`), and the fraction whose top caption is of the right category.

    python benchmarks/vision_crossmodal.py --work /work/runs/vision/crossmodal

The recipe itself is `potstill.vision.crossmodal` (also `potstill vision crossmodal FOLDER`); this script gathers
the experiment's images (clipart, rendered emoji) and writes report.json, report.md, grid.png to --work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from vision_kd import CLIPART, render_emoji, run_main

from potstill.config.base import validate
from potstill.data.captions import path_caption
from potstill.data.images import ImageSet, scan_images
from potstill.vision.crossmodal import CrossmodalRecipe, run_crossmodal


def captions_of(images: ImageSet, local: Path) -> list[str]:
    """The caption of every image (clipart under CLIPART, emoji under `local`)."""
    return [path_caption(r.path, CLIPART if r.path.is_relative_to(CLIPART) else local) for r in images.records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-crossmodal"))
    parser.add_argument("--per-domain", type=int, default=48)
    parser.add_argument("--size", type=int, default=160, help="Lite0 input side")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr, tau=args.tau,
                    split_seed=args.seed, heldout=args.heldout, seeds=args.seeds)  # fmt: skip
    recipe = validate(settings, CrossmodalRecipe)  # checked before any image is rendered or read
    local = args.work / "images"
    render_emoji(local / "emoji", args.per_domain, args.seed)
    images = scan_images([CLIPART, local], per_domain=args.per_domain, seed=args.seed)
    print(images.summary())
    run_crossmodal(args.work, images, captions_of(images, local), recipe)
    print((args.work / "report.md").read_text())


if __name__ == "__main__":
    run_main(main)
