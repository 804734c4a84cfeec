"""`potstill speech transcribe` / `eval` on a tiny Whisper; the issue's bad inputs through the CLI: one line each."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from potstill.data.audio import AudioRecord, write_audio_jsonl
from potstill.data.speech_corpus import POCKETSPHINX_DATA
from potstill.models.whisper import load_whisper
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


@pytest.mark.slow  # ctranslate2's converter, synthesis, one KD and one CE student of a tiny Whisper
@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("espeak-ng", "flite", "sox")) or not POCKETSPHINX_DATA.is_dir(),
    reason="needs apt espeak-ng flite sox pocketsphinx-testdata",
)
def test_recipe_end_to_end_on_a_tiny_teacher(tmp_path, run_main):
    ctranslate2 = pytest.importorskip("ctranslate2.converters")
    hf = tiny_whisper_dir(tmp_path / "hf", merges=True)
    model, _ = load_whisper(hf)
    with torch.no_grad():  # a teacher that ends every transcript after one token (a random one never stops)
        eos = model.config.eos_token_id
        model.model.decoder.embed_tokens.weight[eos] *= 3
        model.model.decoder.layer_norm.weight.zero_()
        model.model.decoder.layer_norm.bias.copy_(model.model.decoder.embed_tokens.weight[eos])
    model.save_pretrained(hf)
    ct2 = tmp_path / "ct2"
    ctranslate2.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(ct2), quantization="float32")
    out = tmp_path / "run"
    args = ["speech", "recipe", "--out", out, "--ct2-dir", ct2, "--train", 4, "--heldout", 2, "--epochs", 1]
    args += ["--seeds", "0", "--parity-clips", "0", "--max-wer", "inf", "--window", "0.5", "--vocab-size", 266]
    args += ["--encoder-layers", "1", "--decoder-layers", "0", "--k", 8]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "kd_seed0", "ce_seed0"}
    assert report["results"]["kd_seed0"]["params"] < report["results"]["teacher"]["params"]
    assert json.loads((out / "student_init" / "config.json").read_text())["vocab_size"] == 266
    assert set(report["cpu_seconds"]) >= {"pseudo_labels", "train_kd_seed0", "eval_teacher"}
    assert run_main(*args).returncode == 0  # a rerun reuses every stage
    assert_bad = run_main("speech", "recipe", "--out", out, "--seeds", "0,x")
    assert assert_bad.returncode == 2 and "--seeds must be an integer (got 'x')" in assert_bad.stderr
