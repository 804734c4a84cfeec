"""The round-trip check of an exported file: load it back, run a probe text, compare with the source model.

The measure, on the probe's token positions (ids from the source tokenizer, so the weights are compared on
identical input), is the **relative logit error**

    rms(logits_file - logits_source) / rms(logits_source - their mean over the vocabulary)

scale-free, so one tolerance per quantization fits models whose logits spread differently; a wrong tensor layout
gives about 1. It is measured twice:

- transformers (GGUF: `gguf_file=`) or onnxruntime (ONNX) loads the file and computes all logits;
- llama.cpp (GGUF, when `xllamacpp` is installed) gives its top-8 next-token log-probabilities at the last
  `LLAMACPP_POSITIONS` prefixes of the probe; their differences to the source's log-probabilities, less each
  position's mean difference (the log-normalizers differ), over the same denominator, estimate the same error.

Both must stay within the quantization's tolerance (`TOLERANCES`, from the measurements in docs/export.md, or the
caller's `max_error`); a file that does not is an error, and the caller deletes it. The GGUF's tokenizer must also
encode the probe to the source's ids, and its config must read back with the source's sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from potstill.errors import UserError
from potstill.export.runtime import LlamaCppModel, OnnxModel, llamacpp_available

log = logging.getLogger(__name__)

PROBE = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The student model learns from the teacher's soft labels. Zürich, 東京, 3.14159."
)
# quantization -> largest relative logit error accepted; see docs/export.md for the measurements behind them
TOLERANCES = {"f32": 5e-3, "f16": 1e-2, "bf16": 3e-2, "q8_0": 5e-2, "q5_1": 0.15, "q5_0": 0.15, "q4_1": 0.3,
              "q4_0": 0.3, "int8": 0.1}  # fmt: skip
LLAMACPP_POSITIONS = 8
LLAMACPP_TOP = 8
# config fields that must survive the trip through a GGUF's metadata (as transformers reads it back)
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "head_dim", "rms_norm_eps", "tie_word_embeddings")  # fmt: skip


def probe_ids(tokenizer) -> list[int]:
    """The probe text as the source tokenizer encodes it (with its special tokens, e.g. <bos>)."""
    return tokenizer(PROBE)["input_ids"]


def relative_logit_error(got: np.ndarray, want: np.ndarray) -> float:
    """rms(got - want) / rms(want - its mean over the last axis), both [seq, vocab]."""
    centered = want - want.mean(-1, keepdims=True)
    return float(np.sqrt(((got - want) ** 2).mean()) / max(np.sqrt((centered**2).mean()), 1e-12))


def source_logits(model, ids: list[int]) -> np.ndarray:
    """[seq, vocab] float32 logits of the source model on `ids`."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def check_gguf(path: Path, source_model, tokenizer, tolerance: float) -> dict:
    """Round-trip check of a GGUF file (see the module docstring); UserError on a mismatch.

    Args:
        tolerance: the largest relative logit error accepted (`TOLERANCES[quant]` by default).

    Returns:
        {"relative_logit_error", "top1_agreement", "tolerance"} and, with llama.cpp installed,
        {"llamacpp": {"relative_logit_error", "top1_agreement", "tolerance"}}.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    ids = probe_ids(tokenizer)
    want = source_logits(source_model, ids)
    folder, name = str(path.parent), path.name
    read = AutoConfig.from_pretrained(folder, gguf_file=name)
    source = source_model.config
    wrong = [f for f in CONFIG_FIELDS if not _same(getattr(read, f, None), getattr(source, f, None))]
    if wrong:
        field = wrong[0]
        raise UserError(f"{path}: check failed, {field} reads back as {getattr(read, field, None)!r}, "
                        f"source has {getattr(source, field, None)!r}")  # fmt: skip
    # the tokenizer class alone: AutoTokenizer would parse the whole file once more for its config
    got_ids = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)(PROBE)["input_ids"]
    if got_ids != ids:
        raise UserError(f"{path}: check failed, the GGUF tokenizer encodes the probe text differently "
                        f"({len(got_ids)} vs {len(ids)} tokens)")  # fmt: skip
    # the source config: transformers' GGUF reader cannot carry Gemma 3's per-layer sliding/full pattern
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=source, dtype=torch.float32)
    got = source_logits(back.eval(), ids)
    del back
    report = _compare("transformers", path, got, want, tolerance)
    if llamacpp_available():
        report["llamacpp"] = _check_llamacpp(path, tokenizer, ids, want, tolerance)
    else:
        log.info("llama.cpp runtime (xllamacpp) not installed: GGUF checked with transformers only")
    return report


def check_onnx(path: Path, source_model, tokenizer, tolerance: float) -> dict:
    """Round-trip check of an ONNX file in onnxruntime; UserError on a mismatch."""
    ids = probe_ids(tokenizer)
    got = OnnxModel(path).logits(ids)
    return _compare("onnxruntime", path, got, source_logits(source_model, ids), tolerance)


def _compare(runtime: str, path: Path, got: np.ndarray, want: np.ndarray, tolerance: float) -> dict:
    error = relative_logit_error(got, want)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    return _judge(runtime, path, error, agree, tolerance)


def _judge(runtime: str, path: Path, error: float, agree: float, tolerance: float) -> dict:
    log.info("%s: relative logit error %.2e (tolerance %.0e), top-1 agreement %.3f", runtime, error, tolerance, agree)
    if not error <= tolerance:  # NaN fails too
        raise UserError(f"{path}: check failed, {runtime} logits differ from the source model's by {error:.3g} "
                        f"(relative), more than the {tolerance:g} this quantization allows")  # fmt: skip
    return {"relative_logit_error": error, "top1_agreement": agree, "tolerance": tolerance}


def _same(a, b) -> bool:
    """Equal, floats up to float32 rounding (GGUF stores float32)."""
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-6, atol=0.0))
    return a == b


def partial_utf8_ids(tokenizer) -> list[int]:
    """Ids whose text alone is not whole UTF-8 characters (byte tokens of multi-byte characters)."""
    backend = tokenizer.backend_tokenizer
    texts = backend.decode_batch([[i] for i in range(backend.get_vocab_size(with_added_tokens=True))])
    return [i for i, text in enumerate(texts) if "\ufffd" in text]


def _check_llamacpp(path: Path, tokenizer, ids: list[int], want: np.ndarray, tolerance: float) -> dict:
    """llama.cpp's top-k next-token log-probs at the last prefixes of the probe vs the source's (module docstring)."""
    runtime = LlamaCppModel(path, n_ctx=max(256, 2 * len(ids)), partial_ids=partial_utf8_ids(tokenizer), f32_cache=True)
    logprobs = want - np.logaddexp.reduce(want, axis=-1, keepdims=True)
    diffs, agree = [], 0
    ends = range(len(ids) - LLAMACPP_POSITIONS + 1, len(ids) + 1)
    for end in ends:
        top_ids, top_lp = runtime.next_logprobs(ids[:end], LLAMACPP_TOP)
        diff = np.asarray(top_lp) - logprobs[end - 1, top_ids]
        diffs.append(diff - diff.mean())
        agree += int(top_ids[0] == int(logprobs[end - 1].argmax()))
    del runtime
    centered = want[ends[0] - 1 :] - want[ends[0] - 1 :].mean(-1, keepdims=True)
    error = float(np.sqrt(np.mean(np.concatenate(diffs) ** 2)) / max(np.sqrt((centered**2).mean()), 1e-12))
    return _judge("llama.cpp", path, error, agree / len(ends), tolerance)
