"""Two tiny tokenizers of different families for the cross-tokenizer tests (built in the session, no downloads;
cached: one of each per session, read them, do not change them).

- `byte_level_bpe(vocab_size)`: GPT-2 style (`Ġ` for a space, every byte a character), `<bos>`/`<eos>`/`<pad>`;
- `metaspace_bpe(vocab_size)`: SentencePiece style (`▁` for a space, `<0xNN>` byte fallback for characters it
  never saw), `<s>`/`</s>`/`<pad>`: another spelling, other special strings, other ids.
"""

from __future__ import annotations

from functools import cache

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Distillation moves knowledge from a large teacher to a small student.",
    "Déjà vu: the café serves crème brûlée, naïve as it sounds.",
    "A student model learns from soft labels, not only hard ones.",
]


@cache
def byte_level_bpe(vocab_size: int = 320, texts: tuple[str, ...] = tuple(TEXTS)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@cache
def metaspace_bpe(vocab_size: int = 200, texts: tuple[str, ...] = tuple(TEXTS)):
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte fallback: every byte has its token
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    fallback = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    fallback.normalizer = normalizers.Replace(" ", "▁")
    fallback.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fallback.add_special_tokens(["<pad>", "</s>", "<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=fallback, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
