"""A Gemma-like tokenizer for the tests of students (tests/student) and exports (tests/export).

`gemma_like_tokenizer(texts)`: a BPE with byte fallback trained on `texts`, spelled like Gemma's (spaces as "▁", no
pre-tokenizer, `<0xNN>` byte tokens after the special tokens, `<bos>` added by the post-processor).
"""

from __future__ import annotations

import json

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def gemma_like_tokenizer(texts: list[str]):
    """A BPE with byte fallback like Gemma's: spaces -> '▁', no pre-tokenizer, `<0xNN>` byte tokens, <bos> added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SPECIALS)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
