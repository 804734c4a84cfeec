"""potstill serve: a real (tiny) model behind the OpenAI API on 127.0.0.1, used by the endpoint client and generate."""

from __future__ import annotations

import json
import threading
import time

import pytest

from potstill.config import GenerateConfig, validate_config
from potstill.teacher.endpoint import EndpointClient, EndpointError, make_request
from potstill.teacher.generate import hf_generate, run_generate

PARAMS = {"temperature": 0.0, "max_tokens": 6, "n": 2, "seed": 0}


@pytest.fixture
def served(tiny_model_dir):
    """(app, base_url) of `create_app(tiny_model_dir)` under uvicorn on a free port; stopped afterwards."""
    import uvicorn

    from potstill.serve import create_app

    app = create_app(tiny_model_dir, name="tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for startup
        if server.started:
            break
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)


def test_models_and_completions_match_local_generation(served, tiny_model_dir):
    from potstill.teacher.load import load_model

    app, url = served
    c = EndpointClient(url, "tiny", max_retries=0)
    assert [m.id for m in c.client.models.list().data] == ["tiny"]
    answer = c.generate(make_request("The quick", PARAMS))
    model, tok = load_model(tiny_model_dir)
    local, _, _ = hf_generate(model, tok, ["The quick"], PARAMS)
    assert answer.texts == local[0] and len(answer.texts) == 2
    assert answer.prompt_tokens > 0 and app.state.requests == 1


def test_chat_on_a_model_without_template_is_refused(served):
    _, url = served
    with pytest.raises(EndpointError, match="refused.*no chat template"):
        EndpointClient(url, "tiny", max_retries=3).generate(make_request("hi", PARAMS, chat=True))


def test_generate_through_the_server_uses_the_cache_on_rerun(served, write_jsonl, tmp_path, monkeypatch):
    app, url = served
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    rows = write_jsonl("p.jsonl", [{"prompt": "def add(a, b):"}, {"prompt": "for i in"}, {"prompt": "The quick"}])
    raw = {
        "inputs": [str(rows)],
        "output": str(tmp_path / "o.jsonl"),
        "teacher": {"backend": "endpoint", "model": "tiny", "base_url": url, "api_key_env": None},
        "sampling": {"max_tokens": 4},
    }
    out = run_generate(validate_config(raw, GenerateConfig))
    assert app.state.requests == 3
    first = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    run_generate(validate_config(raw | {"overwrite": True}, GenerateConfig))
    assert app.state.requests == 3  # counted at the server: nothing was asked twice
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == first
