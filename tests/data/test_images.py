"""The image data layer: folders and JSONL lists, domains, undecodable images, preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from potstill.data.images import Preprocess, scan_images
from potstill.errors import UserError


def _png(path, color=(255, 0, 0, 255), size=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "animals" / "cat.png")
    _png(root / "animals" / "deep" / "dog.png", (0, 255, 0, 255))
    _png(root / "food" / "apple.png", (0, 0, 255, 255))
    _png(root / "loose.png")
    (root / "food" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_domains_and_undecodable_images_named_skipped_counted(folder):
    images = scan_images(folder)
    assert [r.path.name for r in images.records] == ["cat.png", "dog.png", "apple.png", "loose.png"]
    assert images.domains == ["animals", "animals", "food", "default"]
    assert [p.name for p, _ in images.skipped] == ["broken.png"]
    assert "4 images in 3 domains" in images.summary() and "1 skipped" in images.summary()
    assert "broken.png" in images.summary()
    with pytest.raises(UserError, match="broken.png: cannot decode the image") as err:
        scan_images(folder, on_bad="error")
    assert "\n" not in str(err.value)
    _png(folder / "food" / "big.png", size=(30, 30))  # 900 pixels; the others have 200
    big = scan_images(folder, max_pixels=500)
    assert len(big) == 4 and any(p.name == "big.png" and "max_pixels=500" in why for p, why in big.skipped)
    with pytest.raises(UserError, match="none of the 6 images"):
        scan_images(folder, max_pixels=100)


def test_empty_folder_missing_source_bad_option_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for call, needle in [
        (lambda: scan_images(tmp_path / "empty"), "empty: no image files"),
        (lambda: scan_images(tmp_path / "nope"), "nope: not a folder of images or a .jsonl file"),
        (lambda: scan_images(tmp_path / "empty", on_bad="maybe"), "on_bad must be one of"),
        (lambda: scan_images([]), "no source given"),
    ]:
        with pytest.raises(UserError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_jsonl_source_relative_paths_domains_and_bad_line(folder, tmp_path):
    good = tmp_path / "list.jsonl"
    rows = [{"image": "imgs/animals/cat.png", "domain": "pets"}, {"image": str(folder / "food" / "apple.png")}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    images = scan_images(good)
    assert images.domains == ["pets", "default"] and images.records[0].path.name == "cat.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "imgs/animals/cat.png"}\n{"path": "x.png"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected"):
        scan_images(bad)


def test_per_domain_choice_is_seeded_and_fingerprint_follows_content(folder):
    (folder / "food" / "broken.png").unlink()  # the choice is made before decoding: keep every domain decodable
    one = scan_images(folder, per_domain=1, seed=3)
    assert sorted(one.domains) == ["animals", "default", "food"]
    assert [r.path for r in scan_images(folder, per_domain=1, seed=3).records] == [r.path for r in one.records]
    before = one.fingerprint()
    _png(one.records[0].path, (1, 2, 3, 255))
    assert one.fingerprint() != before


def test_pixels_resize_crop_normalize_and_transparency_on_white(tmp_path):
    _png(tmp_path / "a" / "red.png", (255, 0, 0, 255), size=(40, 20))
    _png(tmp_path / "a" / "clear.png", (0, 0, 0, 0), size=(8, 8))
    images = scan_images(tmp_path / "a")
    pre = Preprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), crop=0.8)
    x = images.pixels([1, 0], pre)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    red = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (0 - 0.5) / 1.0])
    torch.testing.assert_close(x[0].mean((1, 2)), red)  # the solid red image
    torch.testing.assert_close(x[1].mean((1, 2)), torch.tensor([2.0, 1.0, 0.5]))  # transparent -> white
    with pytest.raises(UserError, match="preprocess"):
        Preprocess(size=16, crop=0)
