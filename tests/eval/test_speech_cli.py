"""`potstill speech transcribe` / `eval` on a tiny Whisper; the issue's bad inputs through the CLI: one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from potstill.data.audio import AudioRecord, write_audio_jsonl
from speech_helpers import tiny_whisper_dir, write_wav


@pytest.mark.slow  # 40 s at load 25 on 2 cores
def test_transcribe_and_eval(tmp_path, run_main):
    model = tiny_whisper_dir(tmp_path / "model")
    clips = [write_wav(tmp_path / f"{i}.wav", 0.6, seed=i) for i in range(2)]
    proc = run_main("speech", "transcribe", model, *clips)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(c) for c in clips]
    write_audio_jsonl(tmp_path / "d.jsonl", [AudioRecord(str(c), "a b", "synthetic") for c in clips])
    proc = run_main("speech", "eval", model, "--data", tmp_path / "d.jsonl")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["wer"]) == {"synthetic", "overall"} and result["rtf"] > 0


def test_bad_inputs_are_one_line(tmp_path, run_main, assert_one_line_error):
    import soundfile

    model = tiny_whisper_dir(tmp_path / "model")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not audio")
    assert_one_line_error(run_main("speech", "transcribe", model, tmp_path / "junk.wav"), "junk.wav", "does not decode")
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(10, np.float32), 16000)
    assert_one_line_error(run_main("speech", "transcribe", model, tmp_path / "empty.wav"), "empty.wav", "empty audio")
    soundfile.write(str(tmp_path / "slow.wav"), np.zeros(400, np.float32), 400)
    assert_one_line_error(run_main("speech", "transcribe", model, tmp_path / "slow.wav"), "cannot be resampled")
    (tmp_path / "notwhisper").mkdir()
    (tmp_path / "notwhisper" / "config.json").write_text('{"model_type": "llama"}')
    write_audio_jsonl(tmp_path / "d.jsonl", [AudioRecord(str(write_wav(tmp_path / "a.wav", 0.5)), "a")])
    assert_one_line_error(
        run_main("speech", "eval", tmp_path / "notwhisper", "--data", tmp_path / "d.jsonl"), "not a Whisper model"
    )
    empty = tmp_path / "ct2"
    empty.mkdir()
    assert_one_line_error(run_main("speech", "recipe", "--out", tmp_path / "run", "--ct2-dir", empty), "ct2")
