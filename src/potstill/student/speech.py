"""A smaller Whisper student initialised from its teacher's layers, with a shorter audio window.

The student keeps chosen encoder and decoder layers of the teacher (copied whole, in order), the
teacher's convolutions, token embedding (tied output head) and layer norms, and the first
`audio_seconds * 50` encoder positions: it reads windows of `audio_seconds` instead of 30 s, which is
where most of Whisper's CPU time goes (the encoder always runs on its whole window). It is saved as a
plain HF Whisper directory with the teacher's tokenizer and feature extractor.

Vocabulary trimming (`speech_vocabulary`): half of Whisper tiny's weights are its 51,864 x 384 token embedding
(tied head). A trimmed student keeps the ids its pseudo-labels use, their BPE pieces and the 256 byte tokens
(`student.vocab.vocabulary_to_keep`: any text still tokenizes), Whisper's added tokens (<|endoftext|>,
<|startoftranscript|>, <|notimestamps|>, language and task tokens), filled up to `vocab_size` ids with the
teacher BPE's highest-priority merges (`fill_vocabulary`: common English words). The 1,501 timestamp ids
(beyond the tokenizer, never decoded without timestamps) are dropped. Student id i is teacher id
`teacher_ids[i]` (`potstill_vocab.json`, `models.vocab.load_id_map`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from potstill.errors import UserError
from potstill.fileio import atomic_path
from potstill.models.vocab import ID_MAP_FILE
from potstill.models.whisper import load_whisper
from potstill.student.vocab import fill_vocabulary, trim_tokenizer, vocabulary_to_keep
from potstill.teacher.cache.format import tokenizer_fingerprint

POSITIONS_PER_SECOND = 50  # 100 mel frames per second, halved by conv2's stride


def shrink_whisper(
    teacher,
    encoder_layers: Sequence[int],
    decoder_layers: Sequence[int],
    audio_seconds: float,
    keep_ids: Sequence[int] | None = None,
):
    """A `WhisperForConditionalGeneration` holding the chosen layers of `teacher` and a shorter window.

    Args:
        teacher: WhisperForConditionalGeneration.
        encoder_layers: teacher encoder layer indices to keep, in order.
        decoder_layers: teacher decoder layer indices to keep, in order.
        audio_seconds: the student's audio window (<= the teacher's).
        keep_ids: sorted teacher token ids the student keeps (its id i = keep_ids[i]; None = all). The token ids
            of the config and generation config (start, end, suppressed tokens) are renumbered; suppressed ids
            not kept are dropped.

    Raises:
        UserError: a layer index out of range, no layers, or a window longer than the teacher's.
    """
    from transformers import WhisperForConditionalGeneration

    cfg = teacher.config
    for side, chosen, total in (
        ("encoder", encoder_layers, cfg.encoder_layers),
        ("decoder", decoder_layers, cfg.decoder_layers),
    ):
        if not chosen or any(not 0 <= i < total for i in chosen):
            raise UserError(f"student: {side}_layers must be indices in [0, {total}) (got {list(chosen)})")
    positions = int(round(audio_seconds * POSITIONS_PER_SECOND))
    longest = cfg.max_source_positions / POSITIONS_PER_SECOND
    if not 1 <= positions <= cfg.max_source_positions:
        raise UserError(f"student: audio_seconds must be in (0, {longest}] (got {audio_seconds})")
    new_id = {old: new for new, old in enumerate(keep_ids)} if keep_ids is not None else None
    config = type(cfg).from_dict(
        _renumber(
            {**cfg.to_dict(), "encoder_layers": len(encoder_layers), "decoder_layers": len(decoder_layers)}, new_id
        )
    )
    config.max_source_positions = positions
    if keep_ids is not None:
        config.vocab_size = len(keep_ids)
    student = WhisperForConditionalGeneration(config)
    state = {}
    for name, value in teacher.state_dict().items():
        if name == "proj_out.weight":  # tied to embed_tokens
            continue
        parts = name.split(".")
        if parts[1] in ("encoder", "decoder") and parts[2] == "layers":
            chosen = encoder_layers if parts[1] == "encoder" else decoder_layers
            if int(parts[3]) not in chosen:
                continue
            parts[3] = str(list(chosen).index(int(parts[3])))
        if name == "model.encoder.embed_positions.weight":
            value = value[:positions]
        if name == "model.decoder.embed_tokens.weight" and keep_ids is not None:
            value = value[torch.tensor(list(keep_ids))]
        state[".".join(parts)] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "proj_out.weight"]:  # proj_out is tied to embed_tokens
        raise ValueError(f"shrink_whisper: unexpected {unexpected[:3]}, missing {missing[:3]}")
    student.generation_config = type(teacher.generation_config).from_dict(
        _renumber(teacher.generation_config.to_dict(), new_id)
    )
    return student.eval()


def _renumber(config: dict, new_id: dict[int, int] | None) -> dict:
    """A (generation) config dict with its token ids renumbered to a trimmed vocabulary (None: unchanged)."""
    if new_id is None:
        return config
    out = dict(config)
    for key, value in config.items():
        if key.endswith("_token_id") and isinstance(value, int):
            if value not in new_id:
                raise ValueError(f"shrink_whisper: {key} {value} is not among the kept ids")
            out[key] = new_id[value]
        elif key in ("suppress_tokens", "begin_suppress_tokens") and value:
            out[key] = [new_id[i] for i in value if i in new_id]
    return out


def speech_vocabulary(tokenizer, corpus_ids: Sequence[Sequence[int]], vocab_size: int | None = None) -> list[int]:
    """Sorted teacher ids a trimmed student keeps (see the module docstring).

    Args:
        tokenizer: the teacher's Whisper tokenizer (byte-level BPE).
        corpus_ids: token ids the student must be able to emit (the pseudo-labels), no special tokens.
        vocab_size: fill up to this many ids by merge priority (None: only what the corpus needs).
    """
    added = [t["id"] for t in json.loads(tokenizer.backend_tokenizer.to_str())["added_tokens"]]
    keep = sorted(set(vocabulary_to_keep(tokenizer, corpus_ids)) | set(added))
    return fill_vocabulary(tokenizer, keep, vocab_size) if vocab_size else keep


def trim_whisper_tokenizer(tokenizer, keep_ids: list[int], check_texts: Sequence[str] = ()):
    """A Whisper tokenizer over `keep_ids` (`student.vocab.trim_tokenizer`, checked on `check_texts`).

    Returns:
        (WhisperTokenizer, id_map [V_student] long tensor: student id -> teacher id).
    """
    from transformers import WhisperTokenizer

    trimmed, id_map = trim_tokenizer(tokenizer, keep_ids, check_texts)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return WhisperTokenizer(tokenizer_object=trimmed.backend_tokenizer, **specials), id_map


def init_speech_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    encoder_layers: Sequence[int] = (0, 1, 2, 3),
    decoder_layers: Sequence[int] = (0, 3),
    audio_seconds: float = 8.0,
    corpus_ids: Sequence[Sequence[int]] | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a student Whisper directory made from the teacher's layers (`shrink_whisper`).

    Args:
        corpus_ids: the pseudo-labels (teacher ids); given, the student's vocabulary is trimmed
            (`speech_vocabulary`) and `potstill_vocab.json` maps its ids to the teacher's.
        vocab_size: with corpus_ids, the trimmed vocabulary's size (filled by merge priority).
    """
    teacher, processor = load_whisper(teacher_dir)
    keep_ids = id_map = None
    teacher_tokenizer = processor.tokenizer
    if corpus_ids is not None:
        # A model's output need not be the BPE's own tokenization of its text: keep both.
        texts = teacher_tokenizer.batch_decode(corpus_ids)
        canonical = teacher_tokenizer(texts, add_special_tokens=False).input_ids
        keep_ids = speech_vocabulary(teacher_tokenizer, [*corpus_ids, *canonical], vocab_size)
        processor.tokenizer, id_map = trim_whisper_tokenizer(processor.tokenizer, keep_ids, texts)
    student = shrink_whisper(teacher, encoder_layers, decoder_layers, audio_seconds, keep_ids)
    with atomic_path(out_dir) as tmp:
        student.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if id_map is not None:
            vocab = {
                "teacher_vocab_size": teacher.config.vocab_size,
                "teacher_ids": id_map.tolist(),
                "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
            }
            (Path(tmp) / ID_MAP_FILE).write_text(json.dumps(vocab) + "\n")
    return Path(out_dir)


def trainable_parameters(model, freeze_encoder: bool = True) -> list[torch.nn.Parameter]:
    """The parameters a speech student trains: its decoder's layers and layer norm (and the encoder's, if not frozen).

    The convolutions, the fixed sinusoidal positions and the token embedding (tied to the output head, half
    of all weights) stay the teacher's: the small corpus would only overfit them. A frozen encoder (the
    distil-whisper recipe) lets training compute each clip's encoder states once.
    """
    frozen = ("conv1", "conv2", "embed_positions", "embed_tokens", "proj_out") + (
        ("encoder",) if freeze_encoder else ()
    )
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(not any(f in name for f in frozen))
        if param.requires_grad:
            params.append(param)
    return params
