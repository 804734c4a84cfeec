"""The speech teacher's knowledge: pseudo-labels (greedy transcripts) and its top-k distributions along them.

The distil-whisper recipe: the teacher transcribes every training clip; a clip whose transcript is too far
from the known one (word error rate above `max_wer`, both normalized) is dropped; for each kept clip the
teacher's decoding distributions along its own transcript are stored as top-k targets
(`losses.sparse.topk_targets`), so training never runs the teacher. The cache holds every clip with its
teacher WER and is reused when the teacher's fingerprint, the records, k and the temperature match; the WER
filter is applied when it is read (`keep_clips`), so changing `max_wer` never reruns the teacher.

The cache is a directory (`save_speech_targets`, `read_speech_targets`): `targets.safetensors` holds the tensors
of every clip concatenated (no pickle), `manifest.json` the records, WERs, meta, the tensors file's sha256 and a
checksum over its own fields; the directory is written whole under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from potstill.data.audio import AudioRecord, load_audio, log_mel, word_error_rate
from potstill.errors import UserError
from potstill.fileio import atomic_path, write_json_atomic
from potstill.losses.sparse import SparseTargets, topk_targets
from potstill.models.load import file_sha256
from potstill.models.whisper import decoder_prompt, greedy_decode, input_frames, load_whisper
from potstill.teacher.cache.format import manifest_checksum, read_json, teacher_fingerprint, tokenizer_fingerprint

FORMAT = "potstill-speech-targets"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "targets.safetensors"


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
        out: the cache directory (`save_speech_targets`); rebuilt whole when built from other inputs.
        temperature: softmax temperature of the stored top-k log-probs (the loss must use the same one).

    Returns:
        The clips whose teacher WER is at most `max_wer` (`keep_clips`).

    Raises:
        UserError: no clip passes the WER filter; `out` is damaged or not such a cache (`read_speech_targets`).
    """
    out = Path(out)
    meta = {
        "teacher": teacher_fingerprint(teacher_dir),
        "records": records_fingerprint(records),
        "k": k,
        "temperature": temperature,
    }
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty directory is filled
        saved = read_speech_targets(out)
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
    save_speech_targets(every, out)
    return keep_clips(every, max_wer)


def save_speech_targets(targets: SpeechTargets, out: str | Path) -> Path:
    """Write `targets` as the directory `out` (replacing one of ours whole); return `out`.

    `targets.safetensors`: `ids` [T] long (every clip's transcript ids, concatenated), `offsets` [n + 1] long
    (clip i's ids are ids[offsets[i]:offsets[i + 1]]), `topk_ids`, `logprobs` [T + n, k] and `tail` [T + n]
    (clip i's len + 1 target rows start at row offsets[i] + i). `manifest.json` (written last): records, wer,
    dropped, meta, the tensors file's sha256 and `manifest_sha256`.
    """
    from safetensors.torch import save_file

    out = Path(out)
    lengths = [len(seq) for seq in targets.ids]
    tensors = {
        "ids": torch.tensor([i for seq in targets.ids for i in seq], dtype=torch.long),
        "offsets": torch.tensor([0, *lengths], dtype=torch.long).cumsum(0),
        "topk_ids": _cat([t.ids for t in targets.targets], torch.long),
        "logprobs": _cat([t.logprobs for t in targets.targets], torch.float32),
        "tail": _cat([t.tail for t in targets.targets], torch.float32),
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / TENSORS)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": targets.meta,
            "records": [[rec.audio, rec.text, rec.domain] for rec in targets.records],
            "wer": targets.wer,
            "dropped": targets.dropped,
            "temperature": targets.targets[0].temperature if targets.targets else 1.0,
            "tensors_sha256": file_sha256(tmp / TENSORS),
        }
        write_json_atomic(tmp / MANIFEST, {**manifest, "manifest_sha256": manifest_checksum(manifest)})
    return out


def read_speech_targets(path: str | Path) -> SpeechTargets:
    """The targets `save_speech_targets` wrote, verified (manifest checksum, tensors sha256, shapes).

    Raises:
        UserError: one line naming the file: not such a directory, a foreign or edited manifest, a truncated or
            altered tensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_json(path / MANIFEST) if path.is_dir() else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(
            f"{path}: not a potstill speech targets directory (no {MANIFEST} of ours); remove it or choose another path"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path / MANIFEST}: format version {version!r} (this potstill reads {FORMAT_VERSION})")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise UserError(f"{path / MANIFEST}: checksum mismatch (edited or damaged); delete {path} to rebuild it")
    tensors_path = path / TENSORS
    if not tensors_path.is_file() or file_sha256(tensors_path) != manifest.get("tensors_sha256"):
        raise UserError(
            f"{tensors_path}: missing, truncated or altered (sha256 is not {MANIFEST}'s); delete {path} to rebuild it"
        )
    try:
        tensors = load_file(tensors_path)
        records = [AudioRecord(*fields) for fields in manifest["records"]]
        offsets = tensors["offsets"].tolist()
        spans = list(zip(offsets, offsets[1:], strict=False))  # clip i: ids[a:b], target rows [a + i, b + i + 1)
        ids = [tensors["ids"][a:b].tolist() for a, b in spans]
        rows = [slice(a + i, b + i + 1) for i, (a, b) in enumerate(spans)]
        targets = [
            SparseTargets(tensors["topk_ids"][r], tensors["logprobs"][r], tensors["tail"][r], manifest["temperature"])
            for r in rows
        ]
        total = len(tensors["ids"])
        counts = {len(tensors[name]) for name in ("topk_ids", "logprobs", "tail")}
        shapes_ok = (
            len(records) == len(spans) == len(manifest["wer"])
            and (offsets[0], offsets[-1]) == (0, total)
            and counts == {total + len(records)}
        )
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed speech targets ({str(err).splitlines()[0]})") from None
    if not shapes_ok:
        raise UserError(f"{path}: malformed speech targets (clip counts or tensor lengths disagree)")
    return SpeechTargets(records, ids, targets, list(manifest["wer"]), manifest["dropped"], manifest["meta"])


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The parts concatenated along dim 0, their dtype kept (an empty [0] tensor of `dtype` for no parts)."""
    return torch.cat(parts).contiguous() if parts else torch.zeros(0, dtype=dtype)


def is_speech_targets(path: str | Path) -> bool:
    """Whether `path` is a directory whose manifest says it is speech teacher targets (checked by the readers)."""
    manifest = read_json(Path(path) / MANIFEST) if Path(path).is_dir() else None
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def speech_targets_report(path: str | Path) -> str:
    """`potstill cache verify` of a speech targets directory: verify it whole (`read_speech_targets`), summarize."""
    targets = read_speech_targets(path)
    rows = sum(len(t.tail) for t in targets.targets)
    k = targets.targets[0].ids.shape[1] if targets.targets else targets.meta.get("k")
    temperature = targets.targets[0].temperature if targets.targets else None
    size = (Path(path) / TENSORS).stat().st_size
    return "\n".join(
        [
            f"ok: speech teacher targets, {len(targets.records)} clips, {rows} target rows, {size} bytes "
            f"({TENSORS} sha256 and {MANIFEST} checksum match)",
            f"k={k}, T={temperature}, dropped by the WER filter or the length cap: {targets.dropped}",
        ]
    )


def speech_targets_info(path: str | Path) -> str:
    """`potstill cache info` of a speech targets directory: its manifest (verified) with counts for the per-clip
    lists."""
    read_speech_targets(path)
    manifest = read_json(Path(path) / MANIFEST)
    manifest["records"], manifest["wer"] = f"{len(manifest['records'])} clips", f"{len(manifest['wer'])} values"
    return json.dumps(manifest, indent=2)
