"""potstill serve under bad input and load: each class of malformed request gets a 4xx in OpenAI's error shape (never
a 500 with a traceback), the API key, the body / max_tokens / prompt limits, the queue (429, then 503 with
Retry-After), a failing model (a 500 in one line), loopback by default."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from potstill.serve.engine import Engine
from potstill.serve.protocol import ServeLimits

LIMITS = ServeLimits(max_body_bytes=4096, max_tokens=32, max_prompt_tokens=40, max_sequences=4, max_logprobs=5)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer, build_model):
    return Engine(build_model(tiny_tokenizer, 0, max_positions=64), tiny_tokenizer)


@pytest.fixture(scope="module")
def url(engine, live_server):
    with live_server(engine=engine, name="tiny", limits=LIMITS) as (_, base):
        yield base


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def call(method: str, url: str, body=None, headers=None) -> Response:
    """One HTTP exchange (standard library): `body` a dict (sent as JSON), bytes, or an iterator of bytes (chunked)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    chunked = data is not None and not isinstance(data, bytes)
    try:
        conn.request(method, parts.path, body=data, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=chunked)  # fmt: skip
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode())
    finally:
        conn.close()


def post(url: str, body=None, headers=None) -> Response:
    return call("POST", url, body, headers)


def get(url: str, headers=None) -> Response:
    return call("GET", url, None, headers)


def assert_api_error(resp: Response, status: int, *needles: str) -> str:
    """`resp` is `status` with OpenAI's error body: {"error": {"message", "type", "param", "code"}}, one line."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in resp.text
    assert "\n" not in error["message"]
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error["message"]


OK = {"model": "tiny", "prompt": "The quick", "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        (b"{not json", 400, ["not JSON"]),
        (b"[1, 2]", 400, ["JSON object"]),
        ({"model": "tiny"}, 400, ["prompt", "required"]),
        (OK | {"prompt": []}, 400, ["prompt", "empty"]),
        (OK | {"prompt": [[1, 2], []]}, 400, ["prompt", "empty"]),
        (OK | {"prompt": [5, 100000]}, 400, ["token ids", "[0, 300)"]),
        (OK | {"prompt": {"a": 1}}, 400, ["prompt"]),
        (OK | {"max_tokens": -1}, 400, ["max_tokens", "greater than or equal to 0"]),
        (OK | {"no_repeat_ngram_size": -1}, 400, ["no_repeat_ngram_size", "greater than or equal to 0"]),
        (OK | {"max_tokens": 33}, 400, ["max_tokens", "limit of 32", "--max-tokens"]),
        (OK | {"temperature": "hot"}, 400, ["temperature"]),
        (OK | {"top_p": 0}, 400, ["top_p"]),
        (OK | {"n": 5}, 400, ["n", "limit of 4"]),
        (OK | {"stop": [""]}, 400, ["stop", "non-empty"]),
        (OK | {"stop": ["x" * 257]}, 400, ["stop", "at most 256 characters"]),
        (OK | {"logprobs": 6}, 400, ["logprobs", "limit of 5"]),
        (OK | {"logprobs": 1, "stream": True}, 400, ["logprobs", "stream"]),
        (OK | {"model": "gpt-4"}, 404, ["'gpt-4' does not exist", "'tiny'"]),
        (OK | {"prompt": "the cat sat " * 20}, 400, ["tokens, more than the limit of 40", "--max-prompt-tokens"]),
        (OK | {"prompt": list(range(4, 40)), "max_tokens": 30}, 400, ["exceeds the model's context of 64"]),
        (OK | {"prompt": "x" * 5000}, 413, ["over the limit of 4096 bytes"]),
    ],
)
def test_malformed_completion_requests_are_4xx_json(url, body, status, needles):
    assert_api_error(post(f"{url}/completions", body), status, *needles)


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"model": "tiny", "messages": []}, 400, ["messages"]),
        ({"model": "tiny", "messages": [{"role": "user"}]}, 400, ["messages.0.content", "required"]),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, ["no chat template"]),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, ["'nope' does not exist"]),
    ],
)
def test_malformed_chat_requests_are_4xx_json(url, body, status, needles):
    assert_api_error(post(f"{url}/chat/completions", body), status, *needles)


def test_unknown_routes_and_methods_are_json_too(url):
    assert_api_error(post(f"{url}/embeddings", {}), 404, "Not Found")
    assert_api_error(get(f"{url}/completions"), 405, "Method Not Allowed")


def test_a_chunked_body_over_the_limit_is_413(url):
    chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(8))  # no Content-Length: read until the limit
    assert_api_error(post(f"{url}/completions", chunks), 413, "over the limit")


def test_the_api_key_is_required_when_set(engine, live_server):
    import openai

    with live_server(engine=engine, name="tiny", limits=ServeLimits(api_key="s3cret")) as (_, base):
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert_api_error(get(f"{base}/models", headers), 401, "API key")
            assert_api_error(post(f"{base}/completions", OK, headers), 401, "API key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).completions.create(**OK)
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.completions.create(**OK).choices[0].finish_reason in ("stop", "length")


class BlockingEngine(Engine):
    """An engine whose generation waits for `go` (a request that holds the model as long as the test wants)."""

    def __init__(self, engine: Engine):
        super().__init__(engine.model, engine.tokenizer)
        self.go, self.started = threading.Event(), threading.Event()

    def generate(self, *args, **kwargs):
        self.started.set()
        assert self.go.wait(30)
        return super().generate(*args, **kwargs)


def test_a_full_queue_is_429_and_a_long_wait_503_with_retry_after(engine, live_server):
    blocking = BlockingEngine(engine)
    limits = ServeLimits(max_queue=1, queue_timeout=0.5)
    with live_server(engine=blocking, name="tiny", limits=limits) as (_, base):
        results = {}

        def send(key):
            results[key] = post(f"{base}/completions", OK)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert blocking.started.wait(30)  # the first request holds the model
        waiting = threading.Thread(target=send, args=("waiting",))  # waits its turn (queue of 1)...
        waiting.start()
        time.sleep(0.1)
        busy = post(f"{base}/completions", OK)  # ...so the queue is full
        assert_api_error(busy, 429, "--max-queue 1") and busy.headers["retry-after"] == "1"
        waiting.join(30)
        assert_api_error(results["waiting"], 503, "within 0.5 s", "--queue-timeout")
        assert results["waiting"].headers["retry-after"] == "1"
        assert get(f"{base}/models").status_code == 200  # the server itself stays responsive meanwhile
        blocking.go.set()
        first.join(30)
        assert results["first"].status_code == 200
        assert post(f"{base}/completions", OK).status_code == 200  # the model is free again


def test_a_request_whose_client_left_the_queue_is_not_run(engine, live_server):
    blocking = BlockingEngine(engine)
    with live_server(engine=blocking, name="tiny") as (app, base):
        first = threading.Thread(target=post, args=(f"{base}/completions", OK))
        first.start()
        assert blocking.started.wait(30)  # the first request holds the model
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=0.3)
        conn.request("POST", f"{parts.path}/completions", json.dumps(OK), {"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()  # this client gives up while its request waits in the queue
        conn.close()
        time.sleep(0.2)
        blocking.go.set()
        first.join(30)
        assert post(f"{base}/completions", OK).status_code == 200
        assert app.state.requests == 2  # the first and the last: the abandoned one never reached the model


def test_a_free_model_serves_at_once_even_with_no_wait_allowed(engine, live_server):
    with live_server(engine=engine, name="tiny", limits=ServeLimits(queue_timeout=0)) as (_, base):
        assert post(f"{base}/completions", OK).status_code == 200


class FailingEngine(Engine):
    def generate(self, *args, **kwargs):
        raise RuntimeError("boom\nwith a second line")


def test_a_failing_model_is_a_500_in_one_line_without_traceback(engine, live_server):
    with live_server(engine=FailingEngine(engine.model, engine.tokenizer), name="tiny") as (_, base):
        assert_api_error(post(f"{base}/completions", OK), 500, "internal server error")
        stream = post(f"{base}/completions", OK | {"stream": True})
        assert stream.status_code == 200 and "internal server error" in stream.text and "boom" not in stream.text
        assert stream.text.endswith("data: [DONE]\n\n")
        assert post(f"{base}/completions", OK | {"max_tokens": 0, "echo": True}).status_code == 200


def test_loopback_by_default_and_a_warning_without_key_elsewhere(monkeypatch, capsys, tiny_model_dir):
    import uvicorn

    from potstill.serve import serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    serve(tiny_model_dir)
    assert calls[-1]["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    serve(tiny_model_dir, host="0.0.0.0")
    assert calls[-1]["host"] == "0.0.0.0" and "without an API key" in capsys.readouterr().err


def test_cli_bad_options_are_one_line_errors(run_main, assert_one_line_error, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("POTSTILL_TEST_NO_SUCH_KEY", raising=False)
    proc = run_main("serve", tiny_model_dir, "--api-key-env", "POTSTILL_TEST_NO_SUCH_KEY")
    assert_one_line_error(proc, "--api-key-env", "POTSTILL_TEST_NO_SUCH_KEY is not set")
    assert_one_line_error(run_main("serve", tiny_model_dir, "--dtype", "int3"), "--dtype", "int3")
