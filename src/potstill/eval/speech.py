"""Evaluating speech models: WER per domain, real-time factor and size, measured side by side.

Each clip is transcribed alone (batch 1, greedy, `models.whisper.greedy_decode`) and timed from log-mel
features to the last token; the real-time factor is the summed decoding time over the summed audio
duration (lower is faster), in wall seconds (`rtf`) and in this process's CPU seconds (`rtf_cpu`: with one torch
thread, what the wall time would be on an idle core; on a shared machine the wall time includes waiting for it).
WER is corpus WER per domain after Whisper's English normalizer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from potstill.data.audio import AudioRecord, load_audio, log_mel, word_error_rate
from potstill.eval.bench import param_count
from potstill.models.whisper import decoder_prompt, greedy_decode, input_frames, load_whisper


def evaluate_speech(model_dir: str | Path, records: list[AudioRecord], rate: int = 16_000) -> dict:
    """WER per domain and overall, real-time factor and size of one model on `records`.

    Returns:
        {"model", "params", "weights_mb", "rtf", "rtf_cpu", "audio_seconds", "wer": {domain: x, "overall": x},
         "examples": [first three (reference, hypothesis)]}.
    """
    model, processor = load_whisper(model_dir)
    prompt = decoder_prompt(model, processor.tokenizer)
    frames = input_frames(model)
    hyps, seconds, cpu_seconds, audio_seconds = [], 0.0, 0.0, 0.0
    for rec in records:
        clip = load_audio(rec.audio, rate)
        audio_seconds += len(clip) / rate
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            ids = greedy_decode(model, log_mel(processor.feature_extractor, [clip], frames), prompt)[0]
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - start_cpu
        hyps.append(processor.tokenizer.decode(ids, skip_special_tokens=True))
    domains = sorted({rec.domain for rec in records})
    wer = {d: word_error_rate(*_pairs(records, hyps, d)) for d in domains}
    wer["overall"] = word_error_rate([r.text for r in records], hyps)
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return {
        "model": str(model_dir),
        "params": param_count(model),
        "weights_mb": round(weights / 1e6, 1),
        "rtf": seconds / audio_seconds,
        "rtf_cpu": cpu_seconds / audio_seconds,
        "audio_seconds": round(audio_seconds, 1),
        "wer": wer,
        "examples": [(r.text, h) for r, h in zip(records[:3], hyps[:3], strict=True)],
    }


def transcribe_files(model_dir: str | Path, paths: list[str | Path]) -> list[str]:
    """Greedy transcripts of audio files (each alone, in the model's window); every file is decoded first."""
    clips = [load_audio(path) for path in paths]
    model, processor = load_whisper(model_dir)
    prompt, frames = decoder_prompt(model, processor.tokenizer), input_frames(model)
    texts = []
    for clip in clips:
        features = log_mel(processor.feature_extractor, [clip], frames)
        ids = greedy_decode(model, features, prompt)[0]
        texts.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def _pairs(records: list[AudioRecord], hyps: list[str], domain: str) -> tuple[list[str], list[str]]:
    chosen = [(r.text, h) for r, h in zip(records, hyps, strict=True) if r.domain == domain]
    return [r for r, _ in chosen], [h for _, h in chosen]


def ct2_parity(hf_dir: str | Path, ct2_dir: str | Path, records: list[AudioRecord]) -> dict:
    """Check the HF teacher against CTranslate2 on the same features, and against faster-whisper end to end.

    For each clip: CTranslate2's greedy transcript (`ctranslate2.models.Whisper.generate`, beam 1, no timestamps)
    and its per-step full-vocabulary logits; the HF model's greedy transcript and its logits along CTranslate2's
    tokens (suppressed tokens excluded); faster-whisper's transcript of the same 16 kHz samples (its own log-mel).

    Returns:
        {"clips", "same_tokens_as_ct2", "max_abs_logit_diff", "max_abs_logit", "same_text_as_faster_whisper",
         "faster_whisper_differs": [(hf text, faster-whisper text)]}.
    """
    import ctranslate2
    import faster_whisper
    import numpy as np

    model, processor = load_whisper(hf_dir)
    prompt = decoder_prompt(model, processor.tokenizer)
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    fw = faster_whisper.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=1)
    same_ids = same_text = 0
    max_diff = max_logit = 0.0
    differs = []
    for rec in records:
        clip = load_audio(rec.audio)
        features = log_mel(processor.feature_extractor, [clip], input_frames(model))
        ours = greedy_decode(model, features, prompt)[0]
        result = ct2.generate(
            ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1, return_logits_vocab=True
        )[0]
        theirs = result.sequences_ids[0]
        same_ids += ours == theirs
        ct2_logits = torch.from_numpy(np.array(result.logits[0]))  # [steps, V]
        with torch.no_grad():
            hf_logits = model(input_features=features, decoder_input_ids=torch.tensor([prompt + theirs])).logits[0]
        hf_logits = hf_logits[len(prompt) - 1 : len(prompt) - 1 + ct2_logits.shape[0]]
        kept = ct2_logits.abs() < 1e30  # suppressed tokens are set to the lowest float
        max_diff = max(max_diff, (hf_logits - ct2_logits)[kept].abs().max().item())
        max_logit = max(max_logit, hf_logits[kept].abs().max().item())
        segments, _ = fw.transcribe(
            clip, beam_size=1, temperature=0.0, without_timestamps=True, condition_on_previous_text=False
        )
        fw_text = "".join(s.text for s in segments).strip()
        hf_text = processor.tokenizer.decode(ours, skip_special_tokens=True).strip()
        same_text += fw_text == hf_text
        if fw_text != hf_text:
            differs.append((hf_text, fw_text))
    return {
        "clips": len(records),
        "same_tokens_as_ct2": same_ids,
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "same_text_as_faster_whisper": same_text,
        "faster_whisper_differs": differs,
    }
