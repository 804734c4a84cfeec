"""A scripted fake OpenAI-compatible server on 127.0.0.1 for fault tests (429, 500, hangs, bad JSON, drops).

`FakeServer(responder)` answers `/v1/completions` and `/v1/chat/completions` with `responder(prompt) -> text`
(for chat, the last message's content). `script` is a list of faults consumed one per request before normal
answers resume: "429", "500", "400", "hang" (sleeps `hang_s`), "badjson", "drop" (closes the socket without
an answer), or "ok". `hits` counts every HTTP request that arrived.

`FakeServer(scorer=ModelScorer(model, tokenizer))` also answers scoring requests (`/v1/completions` with `echo`,
`logprobs`, `max_tokens: 0`) with a real (tiny) model's log-probs, in the vLLM legacy-completions format.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class ModelScorer:
    """Scoring answers (echo + logprobs, max_tokens 0) of `model`: the log-probs of each prompt's own tokens.

    A string prompt is tokenized with `tokenizer` (so a server with another tokenizer can be faked). Tokens are
    rendered as "token_id:N" (`token_ids`, vLLM's return_tokens_as_token_ids) or as vocabulary strings; `noise`
    adds Gaussian noise of that scale to every log-prob (a non-deterministic server); `logprobs=False` answers
    without them (a server that ignores echo/logprobs).
    """

    def __init__(self, model, tokenizer, token_ids: bool = True, noise: float = 0.0, logprobs: bool = True):
        self.model, self.tokenizer, self.token_ids = model.eval(), tokenizer, token_ids
        self.noise, self.logprobs, self.rng = noise, logprobs, random.Random(0)
        self.lock = threading.Lock()

    def render(self, i: int) -> str:
        return f"token_id:{i}" if self.token_ids else self.tokenizer.convert_ids_to_tokens(i)

    def __call__(self, body: dict) -> list[dict]:
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        return [self.choice(i, p, body.get("logprobs") or 0) for i, p in enumerate(prompts)]

    def choice(self, index: int, prompt, k: int) -> dict:
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not self.logprobs:
            return {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
        with self.lock, torch.no_grad():
            lp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            jitter = [self.rng.gauss(0, self.noise) if self.noise else 0.0 for _ in range(len(ids) * (k + 1))]
        tokens = [self.render(i) for i in ids]
        token_lp, top = [None], [None]
        for t in range(1, len(ids)):
            token_lp.append(float(lp[t - 1, ids[t]]) + jitter.pop())
            values, top_ids = lp[t - 1].topk(k)
            top.append({self.render(int(j)): float(v) + jitter.pop() for v, j in zip(values, top_ids, strict=True)})
        logprobs = {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": [0] * len(ids)}
        return {"index": index, "text": "", "logprobs": logprobs, "finish_reason": "length"}


class FakeServer:
    def __init__(
        self,
        responder: Callable[[str], str] = lambda p: f"echo:{p}",
        script=(),
        hang_s: float = 1.5,
        scorer: ModelScorer | None = None,
    ):
        self.responder, self.script, self.hang_s, self.scorer = responder, list(script), hang_s, scorer
        self.bodies: list[dict] = []
        self.hits, self.prompts = 0, []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next(self, prompt: str) -> str:
        with self._lock:
            self.hits += 1
            self.prompts.append(prompt)
            return self.script.pop(0) if self.script else "ok"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = "messages" in body
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                server.bodies.append(body)
                action = server._next(prompt)
                if action == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if action == "hang":
                    time.sleep(server.hang_s)
                if action in ("429", "500", "400"):
                    return self._send(int(action), {"error": {"message": f"fake {action}", "type": "fake"}})
                if action == "badjson":
                    return self._send(200, b"{not json", raw=True)
                if not chat and body.get("echo") and server.scorer is not None:
                    choices = server.scorer(body)
                    return self._send(
                        200, {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                              "choices": choices, "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                            "total_tokens": 0}},
                    )  # fmt: skip
                text = server.responder(prompt)
                n = body.get("n", 1)
                if chat:
                    choices = [{"index": i, "message": {"role": "assistant", "content": text}} for i in range(n)]
                else:
                    choices = [{"index": i, "text": text, "finish_reason": "stop"} for i in range(n)]
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": 0}
                kind = "chat.completion" if chat else "text_completion"
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": kind,
                        "created": 0,
                        "model": body["model"],
                        "choices": choices,
                        "usage": usage,
                    },
                )

            def _send(self, status: int, payload, raw: bool = False):
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
