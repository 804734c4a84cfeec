"""EndpointClient against a scripted fake server on 127.0.0.1: retries, failures, cache, concurrency, API key."""

from __future__ import annotations

import pytest

from fake_openai import FakeServer, closed_port_url
from potstill.errors import UserError
from potstill.teacher.endpoint import EndpointClient, EndpointError, api_key, make_request

PARAMS = {"temperature": 0.0, "max_tokens": 8, "n": 1, "seed": 0}


def client(url: str, tmp_path=None, **kw) -> EndpointClient:
    kw = {"timeout": 0.5, "max_retries": 2, "backoff": 0.01, "sleep": lambda s: None, **kw}
    return EndpointClient(url, "fake", cache_dir=tmp_path / "cache" if tmp_path else None, **kw)


@pytest.mark.parametrize("fault", ["429", "500", "hang", "badjson", "drop"])
def test_transient_fault_is_retried_once(fault):
    with FakeServer(script=[fault], hang_s=1.0) as server:
        c = client(server.base_url)
        answer = c.generate(make_request("hi", PARAMS))
    assert answer.texts == ["echo:hi"]
    assert server.hits == 2
    assert c.stats.retries == 1 and c.stats.failures == 0 and c.stats.requests == 2


def test_persistent_500_fails_after_bounded_retries():
    with FakeServer(script=["500"] * 10) as server:
        c = client(server.base_url, max_retries=2)
        with pytest.raises(EndpointError) as err:
            c.generate(make_request("hi", PARAMS))
    assert server.hits == 3
    msg = str(err.value)
    assert "HTTP 500 after 3 attempts" in msg and "\n" not in msg and "rerun to resume" in msg
    assert c.stats.failures == 1


def test_client_error_is_not_retried():
    with FakeServer(script=["400"]) as server:
        with pytest.raises(EndpointError, match="refused"):
            client(server.base_url).generate(make_request("hi", PARAMS))
    assert server.hits == 1


def test_unreachable_endpoint_gives_clear_error():
    slept = []
    c = client(closed_port_url(), max_retries=3, backoff=0.2, sleep=slept.append)
    with pytest.raises(EndpointError, match="connection failed after 4 attempts"):
        c.generate(make_request("hi", PARAMS))
    assert len(slept) == 3
    # full jitter: each delay lies in [0, backoff * 2**attempt]
    assert all(0 <= s <= 0.2 * 2**i for i, s in enumerate(slept))


def test_cache_hit_sends_nothing(tmp_path):
    with FakeServer() as server:
        first = client(server.base_url, tmp_path).generate(make_request("hi", PARAMS))
        again = client(server.base_url, tmp_path)
        second = again.generate(make_request("hi", PARAMS))
        other = again.generate(make_request("hi", PARAMS | {"temperature": 0.7}))  # params are part of the key
    assert server.hits == 2
    assert second.texts == first.texts and second.cached and not other.cached
    assert again.stats.cache_hits == 1 and again.stats.requests == 1


def test_map_keeps_order_under_faults_without_loss_or_duplicates():
    prompts = [f"p{i}" for i in range(12)]
    script = ["429", "ok", "500", "drop", "ok", "badjson"]
    with FakeServer(script=script) as server:
        c = client(server.base_url, concurrency=3, max_retries=4)
        texts = [a.texts[0] for a in c.map([make_request(p, PARAMS) for p in prompts])]
    assert texts == [f"echo:{p}" for p in prompts]
    assert sorted(set(server.prompts)) == sorted(prompts)
    assert server.hits == len(prompts) + 4  # one extra hit per fault


def test_chat_request_carries_system_and_user():
    with FakeServer() as server:
        answer = client(server.base_url).generate(make_request("question", PARAMS, chat=True, system="be brief"))
    assert answer.texts == ["echo:question"]


def test_api_key_comes_from_the_named_env_var(monkeypatch):
    monkeypatch.delenv("POTSTILL_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="POTSTILL_TEST_KEY is not set"):
        api_key("POTSTILL_TEST_KEY")
    monkeypatch.setenv("POTSTILL_TEST_KEY", "sk-test")
    assert api_key("POTSTILL_TEST_KEY") == "sk-test"
    assert api_key(None) == "unused"
