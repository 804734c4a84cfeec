"""Speech records: decoding and resampling clips, the one-line errors of bad audio and bad JSONL, WER, the split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from potstill.data.audio import (
    AudioRecord,
    load_audio,
    log_mel,
    read_audio_jsonl,
    word_error_rate,
    write_audio_jsonl,
)
from potstill.errors import UserError
from speech_helpers import write_wav


def test_load_audio_resamples_to_16k_mono(tmp_path):
    import soundfile

    stereo = np.stack([np.sin(np.arange(8000) / 5.0), np.zeros(8000)], axis=1).astype(np.float32) * 0.5
    soundfile.write(str(tmp_path / "a.wav"), stereo, 8000)
    clip = load_audio(tmp_path / "a.wav")
    assert clip.dtype == np.float32 and clip.shape == (16000,)
    assert abs(float(np.abs(clip).max()) - 0.25) < 0.02  # mono = mean of the channels
    assert load_audio(write_wav(tmp_path / "b.wav", 0.5)).shape == (8000,)


def test_bad_audio_is_one_line_error(tmp_path):
    import soundfile

    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(UserError, match="junk.wav: audio does not decode") as err:
        load_audio(tmp_path / "junk.wav")
    assert "\n" not in str(err.value)
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(10, np.float32), 16000)
    with pytest.raises(UserError, match="empty.wav: empty audio"):
        load_audio(tmp_path / "empty.wav")
    soundfile.write(str(tmp_path / "slow.wav"), np.zeros(400, np.float32), 400)
    with pytest.raises(UserError, match="slow.wav: sample rate 400 Hz cannot be resampled"):
        load_audio(tmp_path / "slow.wav")
    with pytest.raises(UserError, match="missing.wav: audio does not decode"):
        load_audio(tmp_path / "missing.wav")


def test_jsonl_round_trip_and_errors(tmp_path):
    wav = write_wav(tmp_path / "audio.wav", 0.2)
    write_audio_jsonl(tmp_path / "d.jsonl", [AudioRecord(str(wav), "hello there", "real")])
    assert json.loads((tmp_path / "d.jsonl").read_text())["audio"] == "audio.wav"  # relative to the file
    assert read_audio_jsonl(tmp_path / "d.jsonl") == [AudioRecord(str(wav), "hello there", "real")]
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav", "text": "ok"}\n{"audio": "b.wav"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'text' must be a string"):
        read_audio_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not JSON"):
        read_audio_jsonl(tmp_path / "bad.jsonl")


def test_log_mel_pads_to_the_window():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=8)
    features = log_mel(extractor, [np.zeros(1600, np.float32), np.ones(40000, np.float32) * 0.1], frames=200)
    assert features.shape == (2, 8, 200)


def test_wer_normalizes_case_punctuation_and_numbers():
    assert word_error_rate(["ten of clubs"], [" 10 of Clubs."]) == 0.0
    assert word_error_rate(["he was not an ill disposed young man"], ["He was not an ill-disposed young man."]) < 0.3
    assert word_error_rate(["a b c d"], ["a x c"]) == 0.5


@pytest.mark.slow  # parses stdlib docstrings: 25 s at load 12 on 2 cores
def test_train_and_heldout_never_share_a_sentence():
    from potstill.data.speech_corpus import choose_sentences

    splits = choose_sentences(60, 20, seed=0)
    assert len(splits["train"]) == 60 and len(splits["heldout"]) == 20
    assert not {t.lower() for t in splits["train"]} & {t.lower() for t in splits["heldout"]}
    assert choose_sentences(60, 20, seed=0) == splits
    assert choose_sentences(60, 20, seed=1)["heldout"] != splits["heldout"]
    assert all(4 <= len(t.split()) <= 14 and not any(c.isdigit() for c in t) for t in splits["train"])


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("espeak-ng", "flite", "sox")), reason="needs apt espeak-ng flite sox"
)
def test_synthesized_corpus_is_seeded_and_resumes(tmp_path):
    from potstill.data.speech_corpus import synthesize_corpus

    paths = synthesize_corpus(tmp_path / "c", 3, 1, seed=0)
    records = read_audio_jsonl(paths["train"]) + read_audio_jsonl(paths["heldout"])
    assert len(records) == 4 and all(r.domain == "synthetic" for r in records)
    first = [load_audio(r.audio) for r in records]
    assert all(len(c) > 16000 * 0.8 for c in first)  # speech plus 0.4 s of silence on each side
    again = synthesize_corpus(tmp_path / "c", 3, 1, seed=0)  # clips already there are kept
    assert read_audio_jsonl(again["train"]) == records[:3]
