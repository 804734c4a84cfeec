"""Speech records: JSONL of `{"audio": path, "text": ..., "domain": ...}`, audio decoding and log-mel features.

`audio` is a path (relative paths are relative to the JSONL file), `text` the exact transcript, `domain`
optional ("default"). `load_audio` decodes any format libsndfile reads (wav, flac, ogg, raw is not
accepted), mixes to mono and resamples to the feature extractor's rate; `log_mel` pads or cuts to the
encoder's window. A clip that does not decode, is empty or silent-length, or has a sample rate outside
[1 kHz, 384 kHz] is a one-line error naming the file. `word_error_rate` scores transcripts (Whisper's English
normalizer, then jiwer's edit counts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import torch

from potstill.errors import UserError

MIN_RATE, MAX_RATE = 1_000, 384_000  # outside this a sample rate is a broken header, not audio
MIN_SECONDS = 0.05


@dataclass(frozen=True)
class AudioRecord:
    """One clip with its transcript.

    Attributes:
        audio: absolute path of the audio file.
        text: exact transcript.
        domain: corpus domain (e.g. "synthetic", "real").
    """

    audio: str
    text: str
    domain: str = "default"


def read_audio_jsonl(path: str | Path) -> list[AudioRecord]:
    """The records of a speech JSONL file.

    Raises:
        UserError: the file is missing, a line is not a JSON object, or `audio` / `text` is missing or not a string.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise UserError(f"{where}: not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with 'audio' and 'text'")
        for key in ("audio", "text"):
            if not isinstance(obj.get(key), str):
                raise UserError(f"{where}: field {key!r} must be a string")
        audio = Path(obj["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        records.append(AudioRecord(str(audio), obj["text"], str(obj.get("domain", "default"))))
    if not records:
        raise UserError(f"{path}: no records")
    return records


def write_audio_jsonl(path: str | Path, records: list[AudioRecord]) -> None:
    """Write records atomically (audio paths relative to the file when they lie below it)."""
    from potstill.fileio import write_text_atomic

    path = Path(path)
    rows = []
    for rec in records:
        audio = Path(rec.audio)
        if audio.is_relative_to(path.parent.resolve()) or audio.is_relative_to(path.parent):
            audio = audio.relative_to(path.parent.resolve() if audio.is_absolute() else path.parent)
        rows.append(json.dumps({"audio": str(audio), "text": rec.text, "domain": rec.domain}))
    write_text_atomic(path, "\n".join(rows) + "\n")


def load_audio(path: str | Path, rate: int = 16_000) -> np.ndarray:
    """Decode a clip to mono float32 at `rate` Hz.

    Returns:
        [samples] float32 in [-1, 1].

    Raises:
        UserError: the file does not decode, is empty (< 50 ms), or declares an impossible sample rate.
    """
    import soundfile

    try:
        data, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as err:
        raise UserError(f"{path}: audio does not decode ({str(err).splitlines()[0]})") from None
    if not MIN_RATE <= source_rate <= MAX_RATE:
        raise UserError(f"{path}: sample rate {source_rate} Hz cannot be resampled (expected {MIN_RATE}..{MAX_RATE})")
    if data.shape[0] < MIN_SECONDS * source_rate:
        raise UserError(f"{path}: empty audio ({data.shape[0]} samples; at least {MIN_SECONDS} s expected)")
    mono = data.mean(axis=1)
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = gcd(source_rate, rate)
        mono = resample_poly(mono, rate // g, source_rate // g).astype(np.float32)
    return mono


def log_mel(feature_extractor, clips: list[np.ndarray], frames: int) -> torch.Tensor:
    """Log-mel features of clips, padded (or cut) to `frames` frames (the encoder's window).

    Returns:
        [B, n_mels, frames] float32.
    """
    samples = frames * feature_extractor.hop_length
    features = feature_extractor(
        [clip[:samples] for clip in clips],
        sampling_rate=feature_extractor.sampling_rate,
        return_tensors="pt",
        padding="max_length",
        max_length=samples,
    ).input_features
    return features[..., :frames]


def normalizer():
    """Whisper's English text normalizer (numbers spelled as digits, punctuation and case removed)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER of normalized texts (an empty normalized reference counts its hypothesis words as insertions)."""
    import jiwer

    norm = normalizer()
    refs, hyps = [norm(r) for r in references], [norm(h) for h in hypotheses]
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        if ref.strip():
            out = jiwer.process_words(ref, hyp)
            errors += out.substitutions + out.deletions + out.insertions
            words += len(ref.split())
        else:
            errors += len(hyp.split())
    return errors / max(words, 1)
