"""The vision recipes end to end on tiny models: report files, fair arms, bad inputs (potstill.vision)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from potstill.data.images import Preprocess, scan_images
from potstill.errors import UserError
from potstill.vision.caption import CaptionRecipe, run_caption
from potstill.vision.classify import ClassifierPair, ClassifyRecipe, run_classify, split
from potstill.vision.cli import load_recipe
from potstill.vision.crossmodal import CrossmodalRecipe, run_crossmodal

TINY_CAPTION = dict(
    teacher_scenes=12, labeled=6, transfer=6, test=3, teacher_width=16, teacher_layers=1, teacher_steps=4,
    student_width=8, steps=6, batch_size=8, seeds=(0,),
)  # fmt: skip


def test_caption_arms_share_data_and_batches(tmp_path):
    # alpha = 0 makes kd the pseudo-label arm and kd_labeled the ce arm: identical results prove that each KD arm sees
    # exactly its twin's examples, batches and initial weights (only the soft targets differ at alpha > 0)
    recipe = CaptionRecipe(**TINY_CAPTION, alpha=0.0, arms=("ce", "pseudo", "kd", "kd_labeled"))
    report = run_caption(tmp_path, recipe)
    runs = {r["arm"]: r for r in report["runs"]}
    assert runs["kd"]["heldout"] == runs["pseudo"]["heldout"] and runs["kd"]["last_loss"] == runs["pseudo"]["last_loss"]
    assert runs["kd_labeled"]["last_loss"] == runs["ce"]["last_loss"]
    assert runs["ce"]["examples"] == 6 * 4 and runs["pseudo"]["examples"] == (6 + 6) * 4  # a caption + 3 questions
    assert set(report["pseudo_label_exact"]) == {"caption", "vqa"}
    for name in ("report.json", "report.md", "grid.png", "teacher-w16-l1-s4-n12.pt"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "report.json").read_text())["runs"] == report["runs"]
    assert "| pseudo (1 seeds) |" in (tmp_path / "report.md").read_text()


def test_caption_refuses_another_tokenizer_and_bad_settings(tmp_path):
    recipe = CaptionRecipe(**TINY_CAPTION)
    with pytest.raises(UserError, match="tokenizer is not the teacher's"):
        run_caption(tmp_path, recipe, student_vocab={"<pad>": 0, "<bos>": 1, "<eos>": 2, "hello": 3})
    with pytest.raises(ValidationError, match="labeled"):
        CaptionRecipe(**TINY_CAPTION | {"labeled": 13})
    with pytest.raises(ValidationError, match="transfer set"):
        CaptionRecipe(**TINY_CAPTION | {"transfer": 0})
    with pytest.raises(ValidationError, match="frozen"):
        recipe.steps = 0  # a recipe cannot change once checked (and is validated on assignment anyway)
    assert not (tmp_path / "report.json").exists()


def _images(root, n_per_domain=10, broken=True):
    # 20 good images: the split hashes each path (tmp paths change between runs), held out at 0.5 it leaves fewer
    # than 2 on either side with probability ~2e-5
    for d, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_domain):
            shade = tuple(min(255, c + 12 * i) for c in colour)
            Image.new("RGB", (20 + i, 18), shade).save(root / d / f"{d} thing_{i}.png")
    if broken:
        (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _pair(student_classes=8):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 8))
    front = nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    tail = nn.Linear(4, student_classes)
    student = nn.Sequential(front, tail).eval()
    pre = Preprocess(16)

    def new_tail():
        copy = nn.Linear(4, student_classes)
        copy.load_state_dict(tail.state_dict())
        return copy

    return ClassifierPair("tiny", teacher.eval(), pre, student, pre, front, new_tail, lambda c: f"class{c}")


def test_classify_recipe_on_a_folder_with_a_broken_image(tmp_path):
    images = scan_images(_images(tmp_path / "imgs"))
    recipe = ClassifyRecipe(k=8, steps=4, batch_size=4, seeds=(0,), heldout=0.5)
    report = run_classify(tmp_path / "run", images, recipe, _pair(), front_key="tiny")
    assert report["skipped"] == 1 and "1 skipped" in report["images"]
    with pytest.raises(UserError, match="at least 2 of each are needed"):
        split(images, 0.0, 0)
    assert [r["arm"] for r in report["runs"]] == ["kd", "hard"]
    assert set(report["ms_per_image"]) == {"student", "teacher"}
    assert report["split"]["train"] + report["split"]["heldout"] == 20
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| kd (1 seeds) |" in md and "speed-up" in md
    assert (tmp_path / "run" / "grid.png").is_file()
    assert (tmp_path / "run" / "teacher-cache" / "manifest.json").is_file()


def test_classify_label_spaces_differ_refused_then_mapped(tmp_path):
    images = scan_images(_images(tmp_path / "imgs", broken=False))
    recipe = ClassifyRecipe(k=8, steps=2, batch_size=4, seeds=(0,), heldout=0.5)
    with pytest.raises(UserError, match="the student has 6 classes, the teacher 8"):
        run_classify(tmp_path / "run", images, recipe, _pair(6), front_key="tiny")
    report = run_classify(tmp_path / "run", images, recipe, _pair(6), front_key="tiny", class_map=[7, 6, 5, 4, 3, 2])
    assert report["before"]["overall"]["kl_to_teacher"] >= 0
    with pytest.raises(UserError, match="--class-map: needs every teacher class"):
        run_classify(tmp_path / "r2", images, ClassifyRecipe(k=5, heldout=0.5), _pair(6), "tiny", class_map=[0] * 6)


class _HashTeacher:
    """A stand-in text encoder: a fixed unit vector per caption word set (no model files)."""

    dim = 8

    def embed(self, texts):
        rows = [torch.tensor(list(hashlib.sha256(t.encode()).digest()[:8]), dtype=torch.float) - 128 for t in texts]
        return nn.functional.normalize(torch.stack(rows), dim=-1)


def test_crossmodal_recipe_with_a_stand_in_teacher(tmp_path):
    images = scan_images(_images(tmp_path / "imgs"))
    captions = [r.path.stem.replace("_", " ") for r in images.records]
    backbone = (lambda x: x.mean((2, 3)), Preprocess(16), 3)
    recipe = CrossmodalRecipe(steps=3, batch_size=4, seeds=(0, 1), arms=("contrastive", "labels"), heldout=0.5)
    report = run_crossmodal(tmp_path / "run", images, captions, recipe, _HashTeacher(), backbone, "mean-rgb")
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [("contrastive", 0), ("labels", 0), ("contrastive", 1),
                                                                ("labels", 1)]  # fmt: skip
    assert all(0 <= r["recall@1"] <= r["recall@5"] <= 1 for r in report["runs"])
    assert "chance (gallery of" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(UserError, match="20 images but 2 captions"):
        run_crossmodal(tmp_path / "run", images, captions[:2], recipe, _HashTeacher(), backbone, "mean-rgb")


def test_recipe_settings_from_yaml_and_options(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 10\nseeds: [3, 4]\narms: [ce, kd]\nlr: 0.01\n")
    recipe = load_recipe(CaptionRecipe, config, {"steps": 20, "labeled": None, "arms": "ce, kd_labeled"})
    assert (recipe.steps, recipe.seeds, recipe.arms, recipe.labeled) == (20, (3, 4), ("ce", "kd_labeled"), 2000)
    assert recipe.lr == 0.01
    assert load_recipe(ClassifyRecipe, None, {"seeds": "5,6", "alpha": 0.0}).seeds == (5, 6)
    config.write_text("stepz: 10\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(config))}: unknown key 'stepz'$"):
        load_recipe(CaptionRecipe, config, {})
    config.write_text(
        "steps: 0\n"
    )  # a value from the file is named by the file and key, one from an option by the option
    with pytest.raises(UserError, match=f"^{re.escape(str(config))}: steps: must be >= 1 \\(got 0\\)$"):
        load_recipe(CaptionRecipe, config, {})
    with pytest.raises(UserError, match=r"^--seeds must be an integer \(got 'x'\)$"):
        load_recipe(CaptionRecipe, None, {"seeds": "0,x"})
    with pytest.raises(UserError, match=r"^--steps must be an integer \(got 2.5\)$"):
        load_recipe(CaptionRecipe, None, {"steps": 2.5})
    with pytest.raises(UserError, match="^config: student_width: must be a multiple of 4"):
        load_recipe(CaptionRecipe, None, {"student_width": 30})
    with pytest.raises(UserError, match="^--seeds: needs at least 1"):
        load_recipe(CrossmodalRecipe, None, {"seeds": " , "})
    with pytest.raises(UserError, match="^config: heldout: must be < 1"):
        load_recipe(CrossmodalRecipe, None, {"heldout": 1.0})
