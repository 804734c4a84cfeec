"""Fixtures of the `potstill serve` tests: a real uvicorn server on a free port of 127.0.0.1, tiny models behind it.

- `live_server(model_dir=None, *, engine=None, name="tiny", limits=None)`: a context manager yielding (app, base_url)
  of `create_app(model_dir)` (or `build_app(engine)`) served by uvicorn in a thread, stopped on exit;
- `chat_model_dir` (one per module): a tiny Llama whose tokenizer has the ChatML template (`<eos>` = `<|im_end|>`).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from chat_tokenizers import instruct


@contextmanager
def _live_server(model_dir=None, *, engine=None, name: str = "tiny", limits=None):
    import uvicorn

    from potstill.serve.app import build_app, create_app
    from potstill.serve.protocol import ServeLimits

    limits = limits or ServeLimits()
    app = create_app(model_dir, name=name, limits=limits) if engine is None else build_app(engine, name, limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):  # bounded wait for startup
        if server.started:
            break
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture(name="live_server", scope="session")
def live_server_fixture():
    """live_server(model_dir=None, *, engine=None, name="tiny", limits=None) -> context manager of (app, base_url)."""
    return _live_server


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_tokenizer, build_model):
    path = tmp_path_factory.mktemp("chat") / "chat-model"
    build_model(instruct(tiny_tokenizer), 3, save_to=path)
    return path
