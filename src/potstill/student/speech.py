"""A smaller Whisper student initialised from its teacher's layers, with a shorter audio window.

The student keeps chosen encoder and decoder layers of the teacher (copied whole, in order), the
teacher's convolutions, token embedding (tied output head) and layer norms, and the first
`audio_seconds * 50` encoder positions: it reads windows of `audio_seconds` instead of 30 s, which is
where most of Whisper's CPU time goes (the encoder always runs on its whole window). It is saved as a
plain HF Whisper directory with the teacher's tokenizer and feature extractor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from potstill.errors import UserError
from potstill.fileio import atomic_path
from potstill.models.whisper import load_whisper

POSITIONS_PER_SECOND = 50  # 100 mel frames per second, halved by conv2's stride


def shrink_whisper(teacher, encoder_layers: Sequence[int], decoder_layers: Sequence[int], audio_seconds: float):
    """A `WhisperForConditionalGeneration` holding the chosen layers of `teacher` and a shorter window.

    Args:
        teacher: WhisperForConditionalGeneration.
        encoder_layers: teacher encoder layer indices to keep, in order.
        decoder_layers: teacher decoder layer indices to keep, in order.
        audio_seconds: the student's audio window (<= the teacher's).

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
    config = type(cfg).from_dict(
        {**cfg.to_dict(), "encoder_layers": len(encoder_layers), "decoder_layers": len(decoder_layers)}
    )
    config.max_source_positions = positions
    student = WhisperForConditionalGeneration(config)
    state = {}
    for name, value in teacher.state_dict().items():
        parts = name.split(".")
        if parts[1] in ("encoder", "decoder") and parts[2] == "layers":
            chosen = encoder_layers if parts[1] == "encoder" else decoder_layers
            if int(parts[3]) not in chosen:
                continue
            parts[3] = str(list(chosen).index(int(parts[3])))
        if name == "model.encoder.embed_positions.weight":
            value = value[:positions]
        state[".".join(parts)] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "proj_out.weight"]:  # proj_out is tied to embed_tokens
        raise ValueError(f"shrink_whisper: unexpected {unexpected[:3]}, missing {missing[:3]}")
    student.generation_config = teacher.generation_config
    return student.eval()


def init_speech_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    encoder_layers: Sequence[int] = (0, 1, 2, 3),
    decoder_layers: Sequence[int] = (0, 3),
    audio_seconds: float = 8.0,
) -> Path:
    """Write a student Whisper directory made from the teacher's layers (`shrink_whisper`)."""
    teacher, processor = load_whisper(teacher_dir)
    student = shrink_whisper(teacher, encoder_layers, decoder_layers, audio_seconds)
    with atomic_path(out_dir) as tmp:
        student.save_pretrained(tmp)
        processor.save_pretrained(tmp)
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
