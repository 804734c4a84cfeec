"""Shared fixtures: a tiny BPE tokenizer and tiny random Llama models (saved as HF directories), JSONL writers.

Everything is built inside the test session (no hub downloads) and takes milliseconds:
- `tiny_tokenizer`: a byte-level BPE (vocab 300) with <pad>, <bos>, <eos>, <unk>, trained on `TINY_CORPUS`;
- `tiny_corpus`: those texts (ASCII, accents, CJK, an emoji, code);
- `make_tokenizer(vocab_size, texts)`: another one (e.g. a mismatched vocabulary);
- `tiny_model`, `make_model(seed, tokenizer)`: a random LlamaForCausalLM (hidden 32, 2 layers, 2 heads);
- `tiny_model_dir`, `make_model_dir(name, seed, tokenizer)`: such a model + tokenizer saved under tmp_path;
- `write_jsonl(name, rows)`: a JSONL file under tmp_path (dict rows are dumped, str rows written verbatim).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Distillation moves knowledge from a large teacher to a small student.",
    "Déjà vu: the café serves crème brûlée, naïve as it sounds.",
    "Zürich, Kraków, São Paulo and Ελλάδα; 東京 and 😀 too.",
    "import torch\nx = torch.zeros(3)\nprint(x.sum())\n",
    "A student model learns from soft labels, not only hard ones.",
]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def pytest_configure(config):
    """One torch thread: tiny models gain nothing from more, and on 2 cores shared by parallel runs a
    2-thread forward of a 32-wide Llama took 0.12 s instead of 0.007 s (thread contention)."""
    import torch

    torch.set_num_threads(1)


def build_tokenizer(vocab_size: int = 300, texts: list[str] = TINY_CORPUS):
    """A byte-level BPE wrapped as a transformers fast tokenizer with pad/bos/eos/unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(tokenizer, seed: int = 0):
    """A random LlamaForCausalLM: hidden 32, 2 layers, 2 heads, vocab = len(tokenizer), float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_corpus():
    return list(TINY_CORPUS)


@pytest.fixture
def make_tokenizer():
    return build_tokenizer


@pytest.fixture
def make_model(tiny_tokenizer):
    """Factory: make_model(seed=0, tokenizer=None) -> a random tiny Llama (over tiny_tokenizer by default)."""
    return lambda seed=0, tokenizer=None: build_model(tokenizer or tiny_tokenizer, seed)


@pytest.fixture
def tiny_model(make_model):
    return make_model()


@pytest.fixture
def make_model_dir(tmp_path, tiny_tokenizer):
    """Factory: make_model_dir(name="tiny-model", seed=0, tokenizer=None) -> saved HF directory."""

    def make(name: str = "tiny-model", seed: int = 0, tokenizer=None) -> Path:
        tok = tokenizer or tiny_tokenizer
        path = tmp_path / name
        build_model(tok, seed).save_pretrained(path)
        tok.save_pretrained(path)
        return path

    return make


@pytest.fixture
def tiny_model_dir(make_model_dir):
    return make_model_dir()


@pytest.fixture
def write_jsonl(tmp_path):
    """Factory: write_jsonl(name, rows) -> path; dict rows are JSON-dumped, str rows written as they are."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
