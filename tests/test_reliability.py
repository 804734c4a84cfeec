"""Root-cause fixes of issue 17 that a bad-input case cannot show alone: JSONL records with U+2028 round-trip
through `generate`, the teacher cache's manifest checksum (and old caches still read), leftover temporary shards,
and `--overwrite` of an interrupted cache build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from potstill.errors import UserError
from potstill.fileio import jsonl_objects, temp_path

LS, PS = "\u2028", "\u2029"


def test_jsonl_reader_splits_lines_only_at_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": f"one{LS}two{PS}three\x85four"}, ensure_ascii=False) + "\n\n", "utf-8")
    assert [obj["text"] for _, obj in jsonl_objects(path)] == [f"one{LS}two{PS}three\x85four"]


def test_generate_round_trips_records_with_unicode_line_separators(tmp_path, tiny_model_dir, run_main):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"the cat{LS}sat{PS}"}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    args = ["generate", f"inputs={rows}", f"output={out}", f"teacher.model={tiny_model_dir}", "sampling.max_tokens=3"]
    assert run_main(*args).returncode == 0
    first = out.read_bytes()
    assert [rec["prompt"] for _, rec in jsonl_objects(out)] == [f"the cat{LS}sat{PS}"]
    rerun = run_main(*args)  # resumes: its own output is accepted, nothing is asked or written again
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_bytes() == first
    assert json.loads((tmp_path / "gen.jsonl.summary.json").read_text())["resumed_rows"] == 1


def test_generate_cuts_only_a_torn_record_of_its_own(tmp_path, tiny_model_dir, run_main):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    out = tmp_path / "gen.jsonl"
    args = ["generate", f"inputs={rows}", f"output={out}", f"teacher.model={tiny_model_dir}", "sampling.max_tokens=2"]
    assert run_main(*args).returncode == 0
    whole = out.read_bytes()
    first_line = whole[: whole.index(b"\n") + 1]
    out.write_bytes(first_line + whole[len(first_line) : len(first_line) + 20])  # killed while writing line 2
    assert run_main(*args).returncode == 0
    assert [rec["source"] for _, rec in jsonl_objects(out)] == [f"{rows}:1", f"{rows}:2"]


# ---- the teacher cache ----


@pytest.fixture(scope="module")
def cache_dir(models_dir, tmp_path_factory) -> Path:
    from potstill.teacher.cache import build_cache

    out = tmp_path_factory.mktemp("c") / "cache"
    build_cache(models_dir / "teacher", [models_dir / "train.jsonl"], out, k=4, seq_len=16, progress=False)
    return out


def _copy(cache_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache_dir, tmp_path / "cache"))


def test_manifest_checksum_refuses_an_edited_temperature(cache_dir, tmp_path):
    from potstill.teacher.cache import TeacherCache

    TeacherCache(cache_dir).verify()
    cache = _copy(cache_dir, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and len(manifest["manifest_sha256"]) == 64
    manifest["temperature"] = 2.0
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="checksum mismatch"):
        TeacherCache(cache)


def test_a_version_1_cache_is_still_read_and_verify_says_it_has_no_checksum(cache_dir, tmp_path):
    from potstill.teacher.cache import TeacherCache, verify_report

    cache = _copy(cache_dir, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (cache / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert len(TeacherCache(cache)) == manifest["sequences"]
    assert "format version 1" in verify_report(cache)


def test_a_manifest_without_a_shard_file_name_is_one_line(cache_dir, tmp_path):
    from potstill.teacher.cache import TeacherCache
    from potstill.teacher.cache.format import manifest_checksum

    cache = _copy(cache_dir, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["shards"][0]["file"]
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # a consistent manifest, only malformed
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest.json: malformed manifest \(missing 'file'\)"):
        TeacherCache(cache)


def _dead_temp(path: Path) -> Path:
    """The temporary name `path` had in a process that is gone (pid 2**22 + 1 is above Linux's pid_max default)."""
    name = temp_path(path).name.split(".tmp-")[0]
    return path.with_name(f"{name}.tmp-{2**22 + 1}-1")


def test_leftover_temp_shards_are_reported_by_verify_and_deleted_on_resume(cache_dir, models_dir, tmp_path, run_main):
    cache = _copy(cache_dir, tmp_path)
    leftover = _dead_temp(cache / "shard-00001.bin")
    leftover.write_bytes(b"half a shard")
    verify = run_main("cache", "verify", cache)
    assert verify.returncode == 0 and "1 temporary file(s)" in verify.stdout and leftover.name in verify.stdout
    (cache / "manifest.json").unlink()  # interrupted before the manifest: the rerun resumes
    args = ["cache", "build", "--teacher", models_dir / "teacher", "--data", models_dir / "train.jsonl"]
    assert run_main(*args, "--out", cache, "--k", "4", "--seq-len", "16").returncode == 0
    assert not leftover.exists()
    assert "temporary" not in run_main("cache", "verify", cache).stdout


def test_overwrite_replaces_an_interrupted_build(cache_dir, models_dir, tmp_path, run_main):
    cache = _copy(cache_dir, tmp_path)
    (cache / "manifest.json").unlink()  # build.json and shards, no manifest: an interrupted build
    _dead_temp(cache / "build.json").write_text("{")
    args = ["cache", "build", "--teacher", models_dir / "teacher", "--data", models_dir / "train.jsonl"]
    proc = run_main(*args, "--out", cache, "--k", "8", "--seq-len", "16", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((cache / "manifest.json").read_text())["k"] == 8
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


def test_a_temp_file_of_ours_does_not_make_a_new_cache_dir_foreign(models_dir, tmp_path, run_main):
    out = tmp_path / "cache"
    out.mkdir()
    _dead_temp(out / "build.json").write_text("{")  # killed between writing build.json and its rename
    args = ["cache", "build", "--teacher", models_dir / "teacher", "--data", models_dir / "train.jsonl"]
    assert run_main(*args, "--out", out, "--k", "4", "--seq-len", "16").returncode == 0
