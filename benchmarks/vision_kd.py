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

    python benchmarks/vision_kd.py --work /tmp/vision_kd            # the cache and the front are reused when valid

The recipe itself is `potstill.vision.classify` (also `potstill vision classify FOLDER`); this script gathers the
experiment's images (clipart, rendered emoji, sample photos) and writes report.json, report.md, grid.png to --work.

Needs `pip install -e '.[vision]'` and the Debian packages openclipart-png and fonts-noto-color-emoji.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

import torch

from potstill.config.base import validate
from potstill.data.images import ImageSet, scan_images
from potstill.errors import UserError
from potstill.vision.classify import ClassifyRecipe, lite_pair, run_classify

CLIPART = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-kd"))
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
    settings = dict(
        k=args.k, temperature=args.temperature, split_seed=args.seed, heldout=args.heldout, seeds=args.seeds,
        alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr, grid=args.grid,
    )  # fmt: skip
    recipe = validate(settings, ClassifyRecipe)  # checked before any image is rendered or read
    images = gather_images(args.work, args.per_domain, args.seed)
    print(images.summary())
    run_classify(args.work, images, recipe, lite_pair(args.cut), front_key=f"lite0-{args.cut}")
    print((args.work / "report.md").read_text())


def run_main(main: Callable[[], None]) -> None:
    """Run a vision benchmark's main: a user mistake (`UserError`) ends it with one line, not a traceback."""
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    run_main(main)
