"""A scripted fake OpenAI-compatible server on 127.0.0.1 for fault tests (429, 500, hangs, bad JSON, drops).

`FakeServer(responder)` answers `/v1/completions` and `/v1/chat/completions` with `responder(prompt) -> text`
(for chat, the last message's content). `script` is a list of faults consumed one per request before normal
answers resume: "429", "500", "400", "hang" (sleeps `hang_s`), "badjson", "drop" (closes the socket without
an answer), or "ok". `hits` counts every HTTP request that arrived.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(self, responder: Callable[[str], str] = lambda p: f"echo:{p}", script=(), hang_s: float = 1.5):
        self.responder, self.script, self.hang_s = responder, list(script), hang_s
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
