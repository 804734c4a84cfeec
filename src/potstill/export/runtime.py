"""Run exported files: a GGUF in llama.cpp (the `xllamacpp` wheel) and an ONNX graph in onnxruntime, batch 1.

Both answer the two questions the round-trip check and `potstill bench` ask: the next-token log-probabilities
after a prefix (`next_logprobs`), and timed greedy generation (`generate_timed`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from potstill.errors import UserError


def llamacpp_available() -> bool:
    """Whether the llama.cpp runtime (`xllamacpp`) is installed."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp's in-process server (`xllamacpp.Server`), one sequence at a time.

    llama.cpp's completion API reports log-probabilities only with a sampled token whose text is complete UTF-8, so
    `next_logprobs` bans (logit bias) the tokens that are not whole characters; the reported top-k log-probabilities
    are those of the model's raw distribution, before that bias.
    """

    def __init__(
        self, path: str | Path, n_ctx: int = 512, threads: int = 1, partial_ids: list[int] = (), f32_cache: bool = False
    ) -> None:
        try:
            import xllamacpp
        except ImportError:
            raise UserError('running a GGUF needs the llama.cpp runtime: pip install "potstill[export]"') from None
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1  # llama.cpp logs every step on stderr otherwise
        if f32_cache:  # llama.cpp keeps keys and values in f16 by default: an error of its own, not the file's
            params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        try:
            self.server = xllamacpp.Server(params)
        except RuntimeError as err:
            raise UserError(f"{path}: llama.cpp cannot load this GGUF ({err})") from None
        self.ban = [[int(i), False] for i in partial_ids]

    def _complete(self, request: dict) -> dict:
        result = self.server.handle_completions({"temperature": 0.0, "cache_prompt": True, **request})
        if "error" in result or "code" in result and "choices" not in result:
            raise RuntimeError(f"llama.cpp: {result}")
        return result

    def next_logprobs(self, ids: list[int], top: int) -> tuple[list[int], list[float]]:
        """Top-`top` next-token ids and log-probabilities after the prefix `ids` (all ids of the model's vocab)."""
        result = self._complete({"prompt": list(ids), "n_predict": 1, "n_probs": top, "logit_bias": self.ban})
        content = (result["choices"][0].get("logprobs") or {}).get("content") or []
        if not content:
            raise RuntimeError(f"llama.cpp returned no log-probabilities: {result['choices'][0]}")
        entries = content[0]["top_logprobs"]
        return [e["id"] for e in entries], [e["logprob"] for e in entries]

    def generate_timed(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        """Greedy `new_tokens` after `ids` (end-of-sequence ignored): (prompt tokens/s, generated tokens/s)."""
        request = {"prompt": list(ids), "n_predict": new_tokens, "ignore_eos": True, "cache_prompt": False}
        timings = self._complete(request)["timings"]
        return timings["prompt_per_second"], timings["predicted_per_second"]


class OnnxModel:
    """An ONNX graph `input_ids [1, seq] -> logits [1, seq, vocab]` (see potstill.export.onnx) in onnxruntime."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError('running an ONNX file needs onnxruntime: pip install "potstill[export]"') from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise UserError(f"{path}: onnxruntime cannot load this file ({str(err).splitlines()[0]})") from None

    def logits(self, ids: list[int]) -> np.ndarray:
        """[seq, vocab] float32 logits of the sequence `ids`."""
        return self.session.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0][0]

    def generate_timed(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        """Greedy `new_tokens` after `ids`, re-reading the sequence per token (no cache): (prompt tok/s, gen tok/s)."""
        start = time.perf_counter()
        seq = list(ids)
        seq.append(int(self.logits(seq)[-1].argmax()))
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return len(ids) / prompt_s, (new_tokens - 1) / (time.perf_counter() - start)
