"""`potstill vision ...`: help, the resolved recipe, and the issue's bad inputs as one-line errors (no model loaded)."""

from __future__ import annotations

import json

import pytest
from PIL import Image


@pytest.mark.parametrize("cmd", ["classify", "crossmodal", "caption"])
def test_vision_commands_answer_help(cmd, run_main):
    proc = run_main("vision", cmd, "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and "--config" in proc.stdout


def test_print_config_merges_yaml_and_options(tmp_path, run_main):
    config = tmp_path / "caption.yaml"
    config.write_text("labeled: 500\nsteps: 100\n")
    proc = run_main("vision", "caption", "--out", tmp_path / "run", "-c", config, "--steps", "50", "--print-config")
    assert proc.returncode == 0
    assert "labeled: 500\n" in proc.stdout and "steps: 50\n" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_empty_folder_missing_source_undecodable_image(tmp_path, run_main, assert_one_line_error):
    (tmp_path / "empty").mkdir()
    for cmd in ("classify", "crossmodal"):
        assert_one_line_error(run_main("vision", cmd, tmp_path / "empty", "--out", tmp_path / "r"), "no image files")
        assert_one_line_error(run_main("vision", cmd, tmp_path / "nope", "--out", tmp_path / "r"), "not a folder")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "ok.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = run_main("vision", "classify", tmp_path / "imgs", "--out", tmp_path / "r", "--on-bad", "error")
    assert_one_line_error(proc, "bad.png", "cannot decode")
    proc = run_main("vision", "classify", tmp_path / "imgs", "--out", tmp_path / "r", "--on-bad", "maybe")
    assert_one_line_error(proc, "on_bad")


_BAD_SETTINGS = [
    ("caption", ["--steps", "-3"], "--steps must be >= 1 (got -3)"),
    ("classify", ["--lr", "nan"], "--lr must be a finite number (got nan)"),
    ("classify", ["--alpha", "2"], "--alpha must be <= 1"),
    ("crossmodal", ["--seeds", "0,-1"], "--seeds must be >= 0"),
    ("crossmodal", ["--arms", "cosine,magic"], "--arms must be one of cosine, mse, contrastive, labels (got 'magic')"),
    ("caption", ["-c", "stepz: 3\n"], "c.yaml: unknown key 'stepz'"),
    ("caption", ["-c", "steps: many\n"], "c.yaml: steps: must be an integer (got 'many')"),
    ("classify", ["-c", "temperature: 0\n"], "c.yaml: temperature: must be > 0"),
    ("caption", ["-c", "teacher_width: 30\n"], "c.yaml: teacher_width: must be a multiple of 4 (got 30)"),
    ("caption", ["--labeled", "3000"], "labeled (3000) must be <= teacher_scenes (2000)"),
    ("caption", ["--transfer", "0"], "arms pseudo and kd need a transfer set"),
]


@pytest.mark.parametrize(("cmd", "args", "expected"), _BAD_SETTINGS)
def test_bad_settings_are_one_line_before_anything_runs(
    cmd, args, expected, tmp_path, run_main, assert_one_line_error, monkeypatch
):
    import potstill.vision.cli as vision_cli

    started = []
    monkeypatch.setattr(vision_cli, "_starts", lambda recipe, print_config: started.append(recipe))
    if args[0] == "-c":
        (tmp_path / "c.yaml").write_text(args[1])
        args = ["-c", tmp_path / "c.yaml"]
    sources = [] if cmd == "caption" else [tmp_path]
    assert_one_line_error(run_main("vision", cmd, *sources, "--out", tmp_path / "r", *args), expected)
    assert not started and not (tmp_path / "r").exists()
    # the same command with a good value reaches the point where the run would start
    run_main("vision", cmd, *sources, "--out", tmp_path / "r", "--steps", "3")
    assert [r.steps for r in started] == [3]


def test_bad_settings_class_map_and_tokenizer(tmp_path, run_main, assert_one_line_error):
    config = tmp_path / "c.yaml"
    config.write_text("stepz: 3\n")
    assert_one_line_error(run_main("vision", "caption", "--out", tmp_path / "r", "-c", config), "unknown key 'stepz'")
    assert_one_line_error(run_main("vision", "caption", "--out", tmp_path / "r", "--seeds", "0,x"), "--seeds")
    assert_one_line_error(run_main("vision", "caption", "--out", tmp_path / "r", "--arms", "kd,magic"), "--arms")
    (tmp_path / "map.json").write_text(json.dumps({"cat": 281}))
    proc = run_main("vision", "classify", tmp_path, "--out", tmp_path / "r", "--class-map", tmp_path / "map.json")
    assert_one_line_error(proc, "--class-map", "JSON list")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    proc = run_main("vision", "caption", "--out", tmp_path / "r", "--student-tokenizer", tmp_path / "tokenizer.json")
    assert_one_line_error(proc, "tokenizer is not the teacher's")
    assert not (tmp_path / "r").exists()
