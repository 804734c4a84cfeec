"""A bounded load test of `potstill serve` on loopback: N concurrent `openai` clients, a fixed number of requests.

Starts `potstill serve MODEL` in a subprocess on a free port of 127.0.0.1 (or uses `--url` of a running server),
sends `--requests` chat (or completion) requests from `--clients` threads, each with its own `openai.OpenAI`
client (no retries: every refusal counts as an error), and prints one JSON object: latency p50 / p99 / max (end of
the answer) and time to first token (streaming), throughput (requests/s, generated or scored tokens/s), and errors
by kind.

    python benchmarks/serve_load.py MODEL_DIR --clients 4 --requests 16 --max-tokens 32 --stream
    python benchmarks/serve_load.py MODEL_DIR --clients 4 --requests 16 --score 256   # as a scoring teacher
    python benchmarks/serve_load.py --tiny /tmp/tiny --clients 16 --requests 64 --serve-args "--max-queue 4"  # overload

Prompts are fixed questions (cycled), sampling is greedy, so reruns send the same work; one untimed warm-up
request goes first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

QUESTIONS = [
    "What is knowledge distillation?",
    "Name three uses of a small language model.",
    "How do I read a file line by line in Python?",
    "What does a teacher model do?",
    "Explain what a tokenizer is in one sentence.",
    "Why would a student model be faster than its teacher?",
    "What is the capital of France?",
    "Give a tip for writing clear documentation.",
]


def tiny_model(path: str) -> str:
    """A random 2-layer Llama (hidden 64) with a byte-level BPE trained on the questions and a ChatML template, saved
    at `path`: the server's own overhead, with next to no model time."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<|im_end|>", "<unk>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(QUESTIONS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, name: str, serve_args: str) -> tuple[subprocess.Popen, str]:
    """`potstill serve` in a subprocess; returns it and its base URL once /v1/models answers (bounded wait)."""
    port = free_port()
    cmd = [sys.executable, "-m", "potstill.cli", "serve", model, "--port", str(port), "--name", name]
    proc = subprocess.Popen(cmd + shlex.split(serve_args), env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"potstill serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("potstill serve did not start within 300 s")


def one_request(client, args, i: int) -> dict:
    """Send request i; its latency, time to first token (streaming) and generated tokens."""
    question, start, first = QUESTIONS[i % len(QUESTIONS)], time.perf_counter(), None
    kw = {"model": args.name, "max_tokens": args.max_tokens, "temperature": 0.0}
    if args.score:  # what EndpointScorer sends: token ids, echo, top-k log-probs, nothing generated
        ids = [random.Random(i).randrange(10, 1000) for _ in range(args.score)]
        resp = client.completions.create(model=args.name, prompt=[ids], echo=True, logprobs=args.logprobs,
                                          max_tokens=0, temperature=0.0,
                                          extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
        assert len(resp.choices[0].logprobs.token_logprobs) == args.score
        return {"latency": time.perf_counter() - start, "ttft": None, "tokens": args.score}
    if args.completions:
        kw["prompt"] = f"Question: {question}\nAnswer:"
        create = client.completions.create
    else:
        kw["messages"] = [{"role": "user", "content": question}]
        create = client.chat.completions.create
    if not args.stream:
        resp = create(**kw)
        return {"latency": time.perf_counter() - start, "ttft": None, "tokens": resp.usage.completion_tokens}
    tokens = 0
    for chunk in create(stream=True, stream_options={"include_usage": True}, **kw):
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def run_load(url: str, args) -> dict:
    import openai

    results, errors, lock, next_i = [], {}, threading.Lock(), [0]

    def worker() -> None:
        client = openai.OpenAI(base_url=url, api_key=args.api_key or "unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if next_i[0] >= args.requests:
                    return
                i, next_i[0] = next_i[0], next_i[0] + 1
            try:
                result = one_request(client, args, i)
            except openai.APIStatusError as err:
                kind = f"HTTP {err.status_code}"
            except openai.APIError as err:
                kind = type(err).__name__
            else:
                kind = None
            with lock:
                if kind is None:
                    results.append(result)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

    one_request(openai.OpenAI(base_url=url, api_key=args.api_key or "unused", max_retries=0), args, 0)  # warm-up
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summarize(results, errors, wall, args)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(results: list[dict], errors: dict[str, int], wall: float, args) -> dict:
    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
    return {
        "clients": args.clients, "requests": args.requests, "ok": len(results), "errors": sum(errors.values()),
        "errors_by_kind": errors, "stream": args.stream,
        "api": "scoring" if args.score else "completions" if args.completions else "chat",
        "max_tokens": args.max_tokens, "wall_s": round(wall, 2),
        "latency_ms": {"p50": ms(quantile(latency, 0.5)), "p99": ms(quantile(latency, 0.99)),
                       "max": ms(max(latency, default=None)),
                       "mean": ms(statistics.fmean(latency)) if latency else None},
        "ttft_ms": {"p50": ms(quantile(ttft, 0.5)), "p99": ms(quantile(ttft, 0.99))} if ttft else None,
        "requests_per_s": round(len(results) / wall, 3),
        ("scored_tokens" if args.score else "generated_tokens"): tokens,
        ("scored_tokens_per_s" if args.score else "generated_tokens_per_s"): round(tokens / wall, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model directory (or .gguf) to serve; omit with --url")
    parser.add_argument("--tiny", metavar="DIR", help="build a random tiny model at DIR and serve it instead of MODEL")
    parser.add_argument("--url", help="base URL of a running server (http://127.0.0.1:8000/v1) instead of MODEL")
    parser.add_argument("--name", default="model", help="the served model name")
    parser.add_argument("--api-key", default=None, help="the key of a server started with --api-key-env")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="stream the answers (adds time to first token)")
    parser.add_argument("--completions", action="store_true", help="/v1/completions instead of chat")
    parser.add_argument(
        "--score",
        type=int,
        default=0,
        metavar="L",
        help="scoring requests instead: L random token ids each, echo + logprobs, max_tokens 0",
    )
    parser.add_argument("--logprobs", type=int, default=20, help="top log-probs per position (--score)")
    parser.add_argument("--serve-args", default="", help="more options of potstill serve, e.g. '--max-queue 4'")
    args = parser.parse_args()
    if args.tiny:
        args.model = tiny_model(args.tiny)
    if bool(args.model) == bool(args.url):
        parser.error("give MODEL (or --tiny DIR) or --url, one of them")
    proc, url = (None, args.url) if args.url else start_server(args.model, args.name, args.serve_args)
    try:
        print(json.dumps(run_load(url, args), indent=1))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
