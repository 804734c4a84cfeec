"""Tiny Whisper models for the speech tests (tests/models, tests/student, tests/train, tests/eval).

`tiny_whisper_dir(path)` writes a random `WhisperForConditionalGeneration` (hidden 16, 2 + 2 layers, 8 mel bins,
a 1-second window) with a byte-level Whisper tokenizer (256 byte tokens + the special tokens Whisper's decoding
needs) and a feature extractor, as an HF directory; `write_wav` writes a clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
N_MELS = 8
SECONDS = 1.0  # window of the tiny model: 100 mel frames, 50 encoder positions


# Merges of the tokenizer with `merges=True`: " the", " to", "ing", " thing" become single tokens.
MERGES = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("Ġt", "o"), ("i", "n"), ("in", "g"), ("Ġth", "ing")]


def tiny_whisper_tokenizer(merges: bool = False):
    """WhisperTokenizerFast over 256 byte tokens (ids 0..255) plus SPECIALS (ids 256..260); with `merges`, the
    MERGES' results take ids 256..262 and SPECIALS 263..267."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    chosen = MERGES if merges else []
    vocab = {ch: i for i, ch in enumerate(alphabet + [a + b for a, b in chosen])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=chosen))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return WhisperTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def tiny_whisper(seed: int = 0, layers: int = 2, merges: bool = False):
    """(random WhisperForConditionalGeneration, tokenizer); vocab = 261 (268 with `merges`), suppressing id 10
    (and 32 at the start)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tokenizer = tiny_whisper_tokenizer(merges)
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=N_MELS,
        d_model=16,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=int(SECONDS * 50),
        max_target_positions=64,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=[10],
        begin_suppress_tokens=[32, eot],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises biases and k_proj-less attention sparsely: make every weight count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    model.generation_config.no_timestamps_token_id = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    return model, tokenizer


def tiny_whisper_dir(path: Path, seed: int = 0, layers: int = 2, merges: bool = False) -> Path:
    """Save `tiny_whisper` with its tokenizer and an 8-bin feature extractor; return the directory."""
    from transformers import WhisperFeatureExtractor

    model, tokenizer = tiny_whisper(seed, layers, merges)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=N_MELS, chunk_length=30).save_pretrained(path)
    return Path(path)


def write_wav(path: Path, seconds: float, rate: int = 16_000, seed: int = 0) -> Path:
    """A clip of noise with a tone, `seconds` long at `rate` Hz (16-bit PCM)."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    clip = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    soundfile.write(str(path), clip.astype(np.float32), rate, subtype="PCM_16")
    return Path(path)
