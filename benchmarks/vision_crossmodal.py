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
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from vision_kd import CLIPART, front, lite_preprocess, load_lite, render_emoji, split

from potstill.data.captions import path_caption
from potstill.data.images import ImageSet, scan_images
from potstill.errors import UserError
from potstill.eval.retrieval import recall_at_k
from potstill.fileio import write_json_atomic
from potstill.losses import Divergence
from potstill.teacher.text_encoder import TextEncoderTeacher, minilm_dir
from potstill.train.classifier import fit_classifier
from potstill.train.embedding import fit_embedder

ARMS = ("cosine", "mse", "contrastive", "labels")


def head(dim: int) -> nn.Module:
    """The trained part of the student: 1280-d pooled Lite0 features -> dim."""
    return nn.Sequential(nn.Linear(1280, 512), nn.GELU(), nn.Linear(512, dim))


@torch.inference_mode()
def image_features(work: Path, images: ImageSet, size: int) -> torch.Tensor:
    """Lite0's pooled features [N, 1280] of every image (frozen, eval mode), saved under `work` by image fingerprint."""
    path = work / f"lite0-pooled-{size}-{images.fingerprint()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    model, pre, parts = load_lite("efficientnet-lite0"), lite_preprocess(size), []
    for i in range(0, len(images), 16):
        x = front(model, 16, images.pixels(range(i, min(i + 16, len(images))), pre))
        parts.append(model._swish(model._bn1(model._conv_head(x))).mean((2, 3)))
    torch.save(torch.cat(parts), path)
    return torch.cat(parts)


def captions_of(images: ImageSet, local: Path) -> list[str]:
    """The caption of every image (clipart under CLIPART, emoji under `local`)."""
    return [path_caption(r.path, CLIPART if r.path.is_relative_to(CLIPART) else local) for r in images.records]


def evaluate(
    scores: torch.Tensor, truth: torch.Tensor, gallery_domain: list[str], query_domain: list[str], unseen: torch.Tensor
) -> dict:
    """recall@1/5 of [Q, G] scores, on every query and on those whose caption no training image has (`unseen` [Q]
    bool), and how often the top caption is of the image's category."""
    top = scores.argmax(-1).tolist()
    same = sum(gallery_domain[g] == d for g, d in zip(top, query_domain, strict=True)) / len(top)
    new = {f"unseen_{k}": v for k, v in recall_at_k(scores[unseen], truth[unseen]).items()}
    return recall_at_k(scores, truth) | new | {"top1_same_category": same}


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
    started, stamp, load_before = (
        time.perf_counter(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        os.getloadavg(),
    )
    local = args.work / "images"
    render_emoji(local / "emoji", args.per_domain, args.seed)
    images = scan_images([CLIPART, local], per_domain=args.per_domain, seed=args.seed)
    print(images.summary())
    captions = captions_of(images, local)
    teacher = TextEncoderTeacher(minilm_dir(args.work / "models"))
    text = teacher.embed(captions)
    feats = image_features(args.work, images, args.size)
    print(f"features and caption embeddings ready after {time.perf_counter() - started:.0f} s")
    train, test = split(images, args.heldout, args.seed)
    gallery = sorted({captions[i] for i in test})
    truth = torch.tensor([gallery.index(captions[i]) for i in test])
    gallery_text = text[[captions.index(c) for c in gallery]]
    gallery_domain = [images.domains[captions.index(c)] for c in gallery]
    query_domain = [images.domains[i] for i in test]
    seen = {captions[i] for i in train}
    unseen = torch.tensor([captions[i] not in seen for i in test])
    classes = sorted(set(images.domains))
    labels = torch.tensor([classes.index(d) for d in images.domains])
    results = {"runs": [], "split": {"train": len(train), "heldout": len(test), "gallery": len(gallery)}}
    results["split"]["heldout_unseen_caption"] = int(unseen.sum())
    results["chance"] = {"recall@1": 1 / len(gallery), "recall@5": 5 / len(gallery)}
    shown = test[:: max(1, len(test) // 12)][:12]
    grid = {"images": shown, "truth": [captions[i] for i in shown]}
    for seed in args.seeds:
        for arm in ARMS:
            torch.manual_seed(seed)
            model = head(teacher.dim)
            start = time.perf_counter()
            if arm == "labels":
                model = nn.Sequential(model, nn.Linear(teacher.dim, len(classes)))
                fit_classifier(model, feats[train], labels[train], None, Divergence(), 0.0, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False)  # fmt: skip
                with torch.no_grad():
                    logp = model(feats[test]).log_softmax(-1)
                scores = logp[:, [classes.index(d) for d in gallery_domain]]
            else:
                fit_embedder(model, feats[train], text[train], arm, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, tau=args.tau, seed=seed, progress=False)  # fmt: skip
                with torch.no_grad():
                    scores = nn.functional.normalize(model(feats[test]), dim=-1) @ gallery_text.T
            run = {"arm": arm, "seed": seed, "train_s": time.perf_counter() - start}
            run |= evaluate(scores, truth, gallery_domain, query_domain, unseen)
            results["runs"].append(run)
            print(json.dumps(run))
            if seed == args.seeds[0]:
                best = scores[[test.index(i) for i in shown]].argmax(-1).tolist()
                grid[arm] = [gallery[g] for g in best]
    results |= {"date": stamp, "load_before": load_before, "load_after": os.getloadavg(), "args": vars(args)}
    results |= {"wall_s": time.perf_counter() - started, "grid": grid, "images": images.summary()}
    write_json_atomic(args.work / "results.json", json.loads(json.dumps(results, default=str)))
    print(table(results))
    draw_grid(images, grid, args.work / "grid.png")
    print(f"date {stamp}, wall {results['wall_s']:.0f} s, load {load_before} -> {results['load_after']}")


def table(results: dict) -> str:
    """Markdown: held-out recall@1 / @5 / top-1 category per arm (mean over seeds ± half the range)."""
    keys = ("recall@1", "recall@5", "unseen_recall@1", "unseen_recall@5", "top1_same_category")
    lines = ["| student head | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for arm in ARMS:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        cells = []
        for k in keys:
            v = [r[k] for r in runs]
            cells.append(f"{sum(v) / len(v):.3f} ± {(max(v) - min(v)) / 2:.3f}")
        lines.append(f"| {arm} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    c = results["chance"]
    chance = f"{c['recall@1']:.3f} | {c['recall@5']:.3f}"
    lines.append(f"| chance (gallery of {results['split']['gallery']}) | {chance} | {chance} | |")
    return "\n".join(lines)


def draw_grid(images: ImageSet, grid: dict, path: Path) -> None:
    """Held-out images with their caption and the caption each student ranks first (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from potstill.data.images import Preprocess, open_rgb, to_array

    cols, n = 4, len(grid["images"])
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False)
    for ax, j in zip(axes.flat, range(n), strict=False):
        ax.imshow(to_array(open_rgb(images.records[grid["images"][j]].path), Preprocess(160)).numpy())
        truth = grid["truth"][j]
        lines = [f"true: {truth[:36]}"] + [
            f"{arm[:5]:5} {'=' if grid[arm][j] == truth else 'x'} {grid[arm][j][:34]}"
            for arm in ("contrastive", "cosine", "labels")
        ]
        ax.text(0, -0.03, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.08, wspace=0.1, hspace=0.55)
    fig.savefig(path, dpi=72)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
