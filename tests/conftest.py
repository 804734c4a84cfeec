"""Shared fixtures: the tiny tokenizer, the one tiny-model builder, the two CLI runners, JSONL writers.

The tests mirror src/potstill (tests/train/ holds the tests of potstill.train, tests/serve/ those of potstill.serve,
...; the top level those of cli.py and demo.py); tests/train/conftest.py and tests/serve/conftest.py add their own
fixtures. Tests use what is here as fixtures:
no test imports conftest or another test module. Everything is built inside the test session (no hub downloads) and
takes milliseconds:

- `tiny_tokenizer`: a byte-level BPE (vocab 300) with <pad>, <bos>, <eos>, <unk>, trained on `TINY_CORPUS`;
- `tiny_corpus`: those texts (ASCII, accents, CJK, an emoji, code);
- `make_tokenizer(vocab_size=300, texts=TINY_CORPUS)`: another one (e.g. a mismatched vocabulary);
- `build_model(tokenizer=None, seed=0, *, arch="llama", hidden=32, layers=2, ..., save_to=None, **config)`: the one
  random tiny causal LM builder (Llama, Gemma 2, Gemma 3 text), see `build_model`;
- `make_model(seed=0, tokenizer=None, **kw)`, `tiny_model`: `build_model` over `tiny_tokenizer` by default;
- `make_model_dir(name="tiny-model", seed=0, tokenizer=None, **kw)`, `tiny_model_dir`: such a model + tokenizer
  saved as an HF directory under tmp_path;
- `models_dir` (one per module): a student (hidden 32), a teacher (hidden 64), a model with another vocabulary and a
  24-line corpus, the tiny models of the training tests (tests/train) and the demo's;
- `run_cli(*args, cwd=None, timeout=300, env=None, nproc=None)`: `potstill ARGS` in a fresh process (a
  `subprocess.CompletedProcess`), as a user runs it; `nproc=N` runs it under torchrun with N processes;
- `run_main(*args)`: `potstill ARGS` in this process (seconds faster: no imports), its output captured at the file
  descriptors; the same `CompletedProcess` as `run_cli`;
- `assert_one_line_error(proc, *needles)`: a user mistake, as either runner reports it: non-zero exit, one line on
  stderr, no traceback, each needle in that line;
- `write_jsonl(name, rows)`: a JSONL file under tmp_path (dict rows are dumped, str rows written verbatim).

Helper modules that are not fixtures are plain modules next to the tests that use them (train/distill_helpers.py:
training-run options, trainers, logs; teacher/fake_openai.py: a fake OpenAI endpoint), or here when tests of several
directories share them (report_inputs.py: what the report reads): pytest's default ("prepend") import mode puts a test
module's directory and this one on sys.path, so test basenames must stay unique.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
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
# model class names in transformers, by `build_model(arch=...)`
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def pytest_configure(config):
    """One torch thread: tiny models gain nothing from more, and on 2 cores shared by parallel runs a
    2-thread forward of a 32-wide Llama took 0.12 s instead of 0.007 s (thread contention)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_potstill_logger():
    """Each test starts with potstill's logger as a new process has it. An in-process command that turns on progress
    lines (`enable_progress_log`: export, student init, GGUF conversion) adds a handler bound to that test's captured
    stderr; left in place, a later test's INFO lines went to a closed file and broke its one-line error check."""
    logger = logging.getLogger("potstill")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


# ---- tokenizer and models ----


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


def build_model(
    tokenizer=None,
    seed: int | None = 0,
    *,
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int | None = 512,
    tie_word_embeddings: bool | None = None,
    save_to: Path | None = None,
    **config,
):
    """A random causal LM (float32, eval mode): `arch` "llama", "gemma2" or "gemma3" (Gemma 3 text).

    - vocab_size: len(tokenizer) by default; bos/eos/pad ids come from the tokenizer (without one: the config's);
    - kv_heads: `heads` by default; intermediate: 2 * hidden by default;
    - max_positions, tie_word_embeddings: None keeps the config class's default (Llama 2048 / untied, Gemma tied);
    - config: further config fields or overrides, e.g. head_dim, final_logit_softcapping (gemma2), layer_types,
      sliding_window (gemma3), bos_token_id;
    - seed: `torch.manual_seed(seed)` right before the weights are drawn; None draws from torch's RNG as it is;
    - save_to: also save the model (and the tokenizer, if any) there as an HF directory.
    """
    import torch
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    fields = {
        "vocab_size": len(tokenizer) if vocab_size is None else vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden if intermediate is None else intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads if kv_heads is None else kv_heads,
    }
    if max_positions is not None:
        fields["max_position_embeddings"] = max_positions
    if tie_word_embeddings is not None:
        fields["tie_word_embeddings"] = tie_word_embeddings
    if tokenizer is not None:
        fields |= {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    model_config = config_class(**(fields | config))
    if seed is not None:
        torch.manual_seed(seed)
    model = model_class(model_config).eval()
    if save_to is not None:
        model.save_pretrained(save_to)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_to)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The texts `tiny_tokenizer` was trained on (one list for the session: read it, do not change it)."""
    return list(TINY_CORPUS)


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory: make_tokenizer(vocab_size=300, texts=TINY_CORPUS) -> another byte-level BPE."""
    return build_tokenizer


@pytest.fixture(name="build_model", scope="session")
def build_model_fixture():
    """The tiny-model builder itself: build_model(tokenizer=None, seed=0, **kw) (see `build_model`)."""
    return build_model


@pytest.fixture(scope="session")
def make_model(tiny_tokenizer):
    """Factory: make_model(seed=0, tokenizer=None, **kw) -> `build_model` over tiny_tokenizer by default (a Llama:
    hidden 32, 2 layers, 2 heads)."""
    return lambda seed=0, tokenizer=None, **kw: build_model(tokenizer or tiny_tokenizer, seed, **kw)


@pytest.fixture
def tiny_model(make_model):
    return make_model()


@pytest.fixture
def make_model_dir(tmp_path, tiny_tokenizer):
    """Factory: make_model_dir(name="tiny-model", seed=0, tokenizer=None, **kw) -> saved HF directory."""

    def make(name: str = "tiny-model", seed: int = 0, tokenizer=None, **kw) -> Path:
        path = tmp_path / name
        build_model(tokenizer or tiny_tokenizer, seed, save_to=path, **kw)
        return path

    return make


@pytest.fixture
def tiny_model_dir(make_model_dir):
    return make_model_dir()


WORDS = "the cat sat on a mat with some dog and bird over there in here while it rains".split()


def write_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(lines):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n")
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_tokenizer, make_tokenizer) -> Path:
    """A student (hidden 32), a bigger teacher (hidden 64), a model with another vocabulary, a corpus: 2-layer
    Llamas (64 positions) over the 300-token tiny tokenizer (the other: 280 tokens), built once per module."""
    root = tmp_path_factory.mktemp("models")
    build_model(tiny_tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tiny_tokenizer, 1, hidden=64, max_positions=64, save_to=root / "teacher")
    build_model(make_tokenizer(vocab_size=280), 2, hidden=32, max_positions=64, save_to=root / "other")
    write_corpus(root / "train.jsonl", 24)
    return root


# ---- the CLI ----


def _run_cli(*args, cwd=None, timeout: float = 300, env: dict | None = None, nproc: int | None = None):
    """Run `python -m potstill.cli ARGS` (under `torchrun --standalone --nproc_per_node NPROC` with `nproc`) and
    capture its output (text); `env` adds variables to this process's environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [sys.executable, *launcher, "-m", "potstill.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _run_main(capture, *args) -> subprocess.CompletedProcess:
    """Run the CLI entry point in this process; `capture` (capfd) holds what it wrote on fd 1 and 2.

    The entry point always ends in SystemExit (its status); what was captured before the call (fixtures'
    progress bars) is dropped.
    """
    from potstill.cli import main

    argv = [str(a) for a in args]
    capture.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capture.readouterr()
    return subprocess.CompletedProcess(["potstill", *argv], exit_info.value.code or 0, out, err)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user mistake: non-zero exit, exactly one line on stderr, no traceback, each needle in it."""
    assert proc.returncode != 0, f"expected failure, got 0; stdout={proc.stdout!r}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(name="run_cli", scope="session")
def run_cli_fixture():
    """run_cli(*args, cwd=None, timeout=300, env=None, nproc=None) -> CompletedProcess of a fresh process."""
    return _run_cli


@pytest.fixture(name="run_main")
def run_main_fixture(capfd):
    """run_main(*args) -> CompletedProcess of `potstill ARGS` run in this process (output captured by capfd)."""
    return lambda *args: _run_main(capfd, *args)


@pytest.fixture(name="assert_one_line_error", scope="session")
def assert_one_line_error_fixture():
    """assert_one_line_error(proc, *needles) -> the error line (proc: from run_cli or run_main)."""
    return _assert_one_line_error


# ---- data files ----


@pytest.fixture
def write_jsonl(tmp_path):
    """Factory: write_jsonl(name, rows) -> path; dict rows are JSON-dumped, str rows written as they are."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
