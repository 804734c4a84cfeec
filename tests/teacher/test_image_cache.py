"""Classifier teachers and their cache: the adapter, cached == online, fingerprints checked, resume, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from potstill.data.images import Preprocess, scan_images
from potstill.errors import UserError
from potstill.losses import Divergence, combine
from potstill.losses.classifier import classifier_kd_terms
from potstill.losses.sparse import topk_targets
from potstill.teacher.cache import MANIFEST, shard_name, verify_report
from potstill.teacher.cache.images import ImageCache, build_image_cache
from potstill.teacher.classifier import ClassifierTeacher, check_label_space, classifier_logits

CLASSES = 10
PRE = Preprocess(size=16)


def tiny_cnn(seed: int = 0, classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = tmp_path / "imgs" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return scan_images(tmp_path / "imgs")


@pytest.mark.parametrize("encoding", ["lossless", "compact"])
def test_cached_targets_equal_online_teacher(images, tmp_path, encoding):
    teacher = ClassifierTeacher(tiny_cnn())
    out = build_image_cache(
        teacher, images, tmp_path / "c", PRE, k=CLASSES, temperature=2.0, encoding=encoding, batch_size=3,
        per_shard=3, progress=False,
    )  # fmt: skip
    cache = ImageCache(out)
    cache.check(teacher, images, PRE, temperature=2.0)
    idx = [6, 0, 3]
    online = teacher.logits(images.pixels(idx, PRE))
    cached = cache.targets(idx)
    expected = topk_targets(online, CLASSES, 2.0)
    assert cached.ids.shape == (3, CLASSES) and cached.temperature == 2.0
    assert torch.equal(cached.ids[:, 0], expected.ids[:, 0])  # top-1 is exact in both encodings
    tol = 0 if encoding == "lossless" else 0.05
    torch.testing.assert_close(cached.logprobs.exp(), expected.logprobs.exp(), atol=tol, rtol=0)
    # the loss on the cache equals the loss on the online teacher (lossless: exactly; gradient too)
    student = tiny_cnn(seed=1)
    div = Divergence("fkl", temperature=2.0)
    labels = online.argmax(-1)
    x = images.pixels(idx, PRE)
    loss_online = combine(classifier_kd_terms(student(x), online, labels, div), 0.8, 2.0)
    loss_cached = combine(classifier_kd_terms(student(x), cached, labels, div), 0.8, 2.0)
    torch.testing.assert_close(loss_cached, loss_online, atol=1e-5 if encoding == "lossless" else 0.02, rtol=0)
    assert verify_report(out).startswith(f"ok: 3 shards, {len(images)} sequences")


def test_rebuild_is_a_no_op_and_an_interrupted_build_resumes_identically(images, tmp_path):
    teacher = ClassifierTeacher(tiny_cnn())
    out = build_image_cache(teacher, images, tmp_path / "c", PRE, k=4, per_shard=2, progress=False)
    shards = {p.name: p.read_bytes() for p in out.glob("shard-*.bin")}
    stamp = (out / MANIFEST).stat().st_mtime_ns
    build_image_cache(teacher, images, out, PRE, k=4, per_shard=2, progress=False)
    assert (out / MANIFEST).stat().st_mtime_ns == stamp  # complete: nothing recomputed
    (out / MANIFEST).unlink()
    (out / shard_name(3)).unlink()  # as if killed while writing the last shard
    with pytest.raises(UserError, match="interrupted"):
        ImageCache(out)
    build_image_cache(teacher, images, out, PRE, k=4, per_shard=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.bin")} == shards
    with pytest.raises(UserError, match="holds a cache built with other settings"):
        build_image_cache(teacher, images, out, PRE, k=5, per_shard=2, progress=False)


def test_check_refuses_another_teacher_images_preprocessing_or_temperature(images, tmp_path):
    teacher = ClassifierTeacher(tiny_cnn())
    cache = ImageCache(build_image_cache(teacher, images, tmp_path / "c", PRE, k=3, progress=False))
    for args, needle in [
        ((ClassifierTeacher(tiny_cnn(seed=5)), images, PRE, 1.0), "another teacher"),
        ((teacher, images.subset([1, 0, 2, 3, 4, 5, 6]), PRE, 1.0), "other images"),
        ((teacher, images, Preprocess(size=17), 1.0), "preprocessing"),
        ((teacher, images, PRE, 2.0), "temperature"),
    ]:
        with pytest.raises(UserError, match=needle) as err:
            cache.check(*args)
        assert "\n" not in str(err.value)


def test_bad_build_options_are_one_line_errors(images, tmp_path):
    teacher = ClassifierTeacher(tiny_cnn())
    for kwargs, needle in [
        ({"k": CLASSES + 1}, "k must be in [1, 10]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"encoding": "zip"}, "encoding must be one of"),
        ({"batch_size": 0}, "must be >= 1"),
    ]:
        with pytest.raises(UserError) as err:
            build_image_cache(teacher, images, tmp_path / "c", PRE, progress=False, **({"k": 4} | kwargs))
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_adapter_takes_plain_modules_and_hf_image_classifiers():
    from transformers import AutoModelForImageClassification, ViTConfig

    x = torch.randn(2, 3, 16, 16)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=5,
    )  # fmt: skip
    hf = AutoModelForImageClassification.from_config(config)
    logits = ClassifierTeacher(hf).logits(x)
    assert logits.shape == (2, 5) and not logits.requires_grad
    torch.testing.assert_close(logits, hf(pixel_values=x).logits)
    assert classifier_logits(tiny_cnn(), x).shape == (2, CLASSES)
    assert ClassifierTeacher(tiny_cnn()).fingerprint == ClassifierTeacher(tiny_cnn()).fingerprint
    assert ClassifierTeacher(tiny_cnn()).fingerprint != ClassifierTeacher(tiny_cnn(seed=1)).fingerprint
    with pytest.raises(UserError, match=r"output \(2, 4, 7, 7\) is not \[batch, classes\] logits"):
        classifier_logits(nn.Conv2d(3, 4, 3, stride=2), x)


def test_label_space_mismatch_needs_a_mapping():
    assert check_label_space(10, 10) is None
    with pytest.raises(UserError, match="the student has 5 classes, the teacher 10: give a class mapping"):
        check_label_space(5, 10)
    assert check_label_space(3, 10, [9, 0, 4]).tolist() == [9, 0, 4]
    with pytest.raises(UserError, match="class mapping: needs 3 teacher class indices"):
        check_label_space(3, 10, [9, 0, 10])
