"""The speech teacher's knowledge: pseudo-labels (greedy transcripts) and its top-k distributions along them.

The distil-whisper recipe: the teacher transcribes every training clip; a clip whose transcript is too far
from the known one (word error rate above `max_wer`, both normalized) is dropped; for each kept clip the
teacher's decoding distributions along its own transcript are stored as top-k targets
(`losses.sparse.topk_targets`), so training never runs the teacher. The file holds every clip with its
teacher WER and is reused when the teacher's fingerprint, the records, k and the temperature match; the WER
filter is applied when it is read (`keep_clips`), so changing `max_wer` never reruns the teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from potstill.data.audio import AudioRecord, load_audio, log_mel, word_error_rate
from potstill.errors import UserError
from potstill.fileio import atomic_path
from potstill.losses.sparse import SparseTargets, topk_targets
from potstill.models.whisper import decoder_prompt, greedy_decode, input_frames, load_whisper
from potstill.teacher.cache.format import teacher_fingerprint, tokenizer_fingerprint


@dataclass
class SpeechTargets:
    """Pseudo-labels and teacher targets of the kept training clips.

    Attributes:
        records: the kept records.
        ids: per record, the teacher's transcript token ids (no prompt, no end token).
        targets: per record, SparseTargets [len(ids) + 1, k] predicting each id and the end token.
        wer: per record, the teacher's WER against the known transcript.
        dropped: records removed (by the WER filter, or a transcript cut by the length cap).
        meta: what the file was built from (teacher and tokenizer fingerprints, records fingerprint, k,
            temperature; `max_wer` once filtered).
    """

    records: list[AudioRecord]
    ids: list[list[int]]
    targets: list[SparseTargets]
    wer: list[float]
    dropped: int
    meta: dict


def records_fingerprint(records: list[AudioRecord]) -> str:
    """sha256 of the records' audio paths, file sizes and transcripts."""
    digest = hashlib.sha256()
    for rec in records:
        size = Path(rec.audio).stat().st_size if Path(rec.audio).exists() else -1
        digest.update(json.dumps([rec.audio, size, rec.text, rec.domain]).encode())
    return digest.hexdigest()


def transcribe(
    model, processor, records: list[AudioRecord], batch_size: int = 4, return_logits: bool = False, cap: bool = False
):
    """Greedy transcripts (token ids) of records, in batches; with return_logits also the step logits.

    With `cap`, decoding stops after 2 x (tokens of the known transcript) + 8 tokens: a longer transcript is a
    loop the WER filter drops anyway, and on a slow CPU it would cost most of the teacher's time.
    """
    from tqdm.auto import tqdm

    prompt = decoder_prompt(model, processor.tokenizer)
    ids, logits = [], []
    for start in tqdm(range(0, len(records), batch_size), desc="transcribe"):
        batch = records[start : start + batch_size]
        features = log_mel(processor.feature_extractor, [load_audio(r.audio) for r in batch], input_frames(model))
        longest = max(len(processor.tokenizer(" " + r.text, add_special_tokens=False).input_ids) for r in batch)
        limit = 2 * longest + 8 if cap else 96
        out = greedy_decode(model, features, prompt, max_new_tokens=limit, return_logits=return_logits)
        ids += out[0] if return_logits else out
        logits += out[1] if return_logits else []
    return (ids, logits) if return_logits else ids


def keep_clips(targets: SpeechTargets, max_wer: float) -> SpeechTargets:
    """The clips whose teacher WER is at most `max_wer` (the distil-whisper filter).

    Raises:
        UserError: no clip passes.
    """
    chosen = [i for i, wer in enumerate(targets.wer) if wer <= max_wer]
    if not chosen:
        raise UserError(
            f"no training clip has a teacher WER <= {max_wer} ({targets.dropped} more were cut by the length cap: "
            "the teacher looped); raise max_wer or check the audio"
        )
    return SpeechTargets(
        [targets.records[i] for i in chosen],
        [targets.ids[i] for i in chosen],
        [targets.targets[i] for i in chosen],
        [targets.wer[i] for i in chosen],
        targets.dropped + len(targets.records) - len(chosen),
        {**targets.meta, "max_wer": max_wer},
    )


def build_speech_targets(
    teacher_dir: str | Path,
    records: list[AudioRecord],
    out: str | Path,
    k: int = 64,
    max_wer: float = 0.2,
    temperature: float = 1.0,
) -> SpeechTargets:
    """Pseudo-label and score `records` with the teacher once (reusing `out` built from the same inputs); filter.

    Args:
        temperature: softmax temperature of the stored top-k log-probs (the loss must use the same one).

    Returns:
        The clips whose teacher WER is at most `max_wer` (`keep_clips`).

    Raises:
        UserError: no clip passes the WER filter.
    """
    out = Path(out)
    meta = {
        "teacher": teacher_fingerprint(teacher_dir),
        "records": records_fingerprint(records),
        "k": k,
        "temperature": temperature,
    }
    if out.is_file():
        saved = torch.load(out, weights_only=False)
        if {key: saved.meta.get(key) for key in meta} == meta:
            return keep_clips(saved, max_wer)
    model, processor = load_whisper(teacher_dir)
    meta["tokenizer"] = tokenizer_fingerprint(processor.tokenizer)
    ids, logits = transcribe(model, processor, records, return_logits=True, cap=True)
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    every = SpeechTargets([], [], [], [], 0, meta)
    for rec, seq, rows, text in zip(records, ids, logits, texts, strict=True):
        if len(rows) != len(seq) + 1:  # cut by the length cap: a loop
            every.dropped += 1
            continue
        every.records.append(rec)
        every.ids.append(seq)
        every.targets.append(topk_targets(rows, k, temperature))
        every.wer.append(word_error_rate([rec.text], [text]))
    with atomic_path(out) as tmp:
        torch.save(every, tmp)
    return keep_clips(every, max_wer)
