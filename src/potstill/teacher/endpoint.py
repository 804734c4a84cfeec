"""A black-box teacher behind an OpenAI-compatible HTTP endpoint: retries, a concurrency limit, a request cache.

`EndpointClient` sends completion or chat requests through the official `openai` client (its own retries
are off, ours are counted). A request is retried on 429, 5xx, timeouts, dropped connections and
malformed responses, `max_retries` times, with exponential backoff and full jitter
(`sleep = uniform(0, backoff * 2**attempt)`); other 4xx answers (a bad request, a model without a chat
template) are not retried. Once the retries are spent the request raises `EndpointError`.

Every successful answer is stored on disk under `cache_dir/<key[:2]>/<key>.json`, where the key is the
sha256 of (model, kind, prompt or messages, sampling params); a rerun or a resumed run reads it there
and sends nothing. `map` runs many requests with at most `concurrency` in flight and yields results
in input order. `stats` counts requests sent, cache hits, retries, failures and tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.fileio import write_text_atomic

log = logging.getLogger(__name__)

NO_KEY = "unused"  # servers without authentication (potstill serve without --api-key-env) still get a bearer token


class EndpointError(UserError):
    """A request that still failed after all retries (or was refused with a non-retryable status)."""


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        prompt: the text to continue (completion API), or None for chat.
        messages: chat messages [{"role", "content"}], or None for the completion API.
        params: sampling parameters sent as they are (temperature, top_p, max_tokens, n, seed).
    """

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def chat(self) -> bool:
        return self.messages is not None


@dataclass
class Answer:
    """The texts of one request (n samples), whether `max_tokens` cut each (finish_reason "length"; False when the
    server or an older cache entry did not say), its token usage; `cached` when read from disk."""

    texts: list[str]
    cut: list[bool] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass
class EndpointStats:
    """Counters of one client (thread-safe updates through `add`)."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


def make_request(prompt: str, params: dict[str, Any], chat: bool = False, system: str | None = None) -> Request:
    """A `Request` for `prompt`: the text itself, or (chat) an optional system message + one user message."""
    frozen = tuple(sorted(params.items()))
    if not chat:
        return Request(prompt=prompt, params=frozen)
    messages = ((("system", system),) if system else ()) + (("user", prompt),)
    return Request(messages=messages, params=frozen)


def api_key(env_name: str | None) -> str:
    """The API key from the environment variable named `env_name` (never from a file); no name: no key."""
    if env_name is None:
        return NO_KEY
    value = os.environ.get(env_name)
    if not value:
        raise UserError(
            f"teacher.api_key_env: environment variable {env_name} is not set; export it "
            "(or set teacher.api_key_env=null for a server without authentication)"
        )
    return value


class RequestCache:
    """Answers on disk, one JSON file per request key, written atomically (temp name, then rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, request: Request) -> str:
        payload = {
            "model": model,
            "kind": "chat" if request.chat else "completion",
            "input": [list(m) for m in request.messages] if request.chat else request.prompt,
            "params": dict(request.params),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Answer | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return Answer(texts=data["texts"], cut=data.get("cut", [False] * len(data["texts"])), cached=True)

    def put(self, key: str, answer: Answer) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"texts": answer.texts, "cut": answer.cut}, ensure_ascii=False))


class EndpointClient:
    """OpenAI-compatible teacher with retries, backoff + jitter, a concurrency limit and a disk cache.

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: model name sent with each request.
        key: the API key (see `api_key`).
        timeout: seconds per attempt.
        max_retries: retries after the first attempt (so at most max_retries + 1 attempts).
        backoff: first retry delay bound in seconds; doubles each attempt (full jitter).
        concurrency: requests in flight at once in `map`.
        cache_dir: request cache directory, or None for no cache.
        sleep: the sleep function (tests pass a fake one).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        key: str = NO_KEY,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        concurrency: int = 4,
        cache_dir: str | Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import openai

        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.base_url, self.model = base_url, model
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, concurrency
        self.cache = RequestCache(cache_dir) if cache_dir is not None else None
        self.stats = EndpointStats()
        self._sleep = sleep

    @classmethod
    def from_settings(cls, settings, cache_dir: str | Path | None = None) -> EndpointClient:
        """The client of a config section that names an endpoint (`base_url`, `model`, `api_key_env`, `timeout`,
        `max_retries`, `backoff`, `concurrency`: generate's `teacher` or a run's `teacher.endpoint`)."""
        return cls(
            settings.base_url,
            settings.model,
            key=api_key(settings.api_key_env),
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            backoff=settings.backoff,
            concurrency=settings.concurrency,
            cache_dir=cache_dir,
        )

    def generate(self, request: Request) -> Answer:
        """One request: from the cache, else sent (with retries) and cached.

        Raises:
            EndpointError: still failing after the retries, or refused (4xx other than 429).
        """
        key = self.cache.key(self.model, request) if self.cache else None
        if key is not None and (hit := self.cache.get(key)) is not None:
            self.stats.add(cache_hits=1)
            return hit
        answer = self._send_with_retries(request)
        if key is not None:
            self.cache.put(key, answer)
        return answer

    def map(self, requests: list[Request]) -> Iterator[Answer]:
        """Answers of `requests` in input order, at most `concurrency` in flight.

        A failing request raises when its turn comes; answers before it have been yielded, and the
        ones after it that finished are in the cache.
        """
        window = 2 * self.concurrency  # submit ahead only this far: a failure leaves little work in flight
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures: deque[Future] = deque()
            try:
                for request in requests:
                    futures.append(pool.submit(self.generate, request))
                    if len(futures) >= window:
                        yield futures.popleft().result()
                while futures:
                    yield futures.popleft().result()
            finally:
                for future in futures:
                    future.cancel()

    def _send_with_retries(self, request: Request) -> Answer:
        return self.retrying(lambda: self._send(request))

    def retrying(self, send: Callable[[], Any]) -> Any:
        """`send()` (one HTTP exchange through `self.client`), retried as every request of this client is.

        A `UserError` raised by `send` (an answer that can never be right) is not retried.

        Raises:
            EndpointError: still failing after the retries, or refused (4xx other than 429).
        """
        for attempt in range(self.max_retries + 1):
            try:
                self.stats.add(requests=1)
                return send()
            except UserError:
                self.stats.add(failures=1)
                raise
            except Exception as err:  # noqa: BLE001 - classified right below
                reason = self._retry_reason(err)
                if reason is None or attempt == self.max_retries:
                    self.stats.add(failures=1)
                    raise self._final_error(err, reason, attempt) from None
                self.stats.add(retries=1)
                delay = random.uniform(0, self.backoff * 2**attempt)
                log.info("endpoint: %s; retry %d/%d in %.2fs", reason, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _send(self, request: Request) -> Answer:
        params = dict(request.params)
        if request.chat:
            messages = [{"role": role, "content": content} for role, content in request.messages]
            resp = self.client.chat.completions.create(model=self.model, messages=messages, **params)
            texts = [choice.message.content for choice in resp.choices]
        else:
            resp = self.client.completions.create(model=self.model, prompt=request.prompt, **params)
            texts = [choice.text for choice in resp.choices]
        if not texts or any(not isinstance(t, str) for t in texts):
            raise _MalformedResponse("response has no text in its choices")
        usage = getattr(resp, "usage", None)
        answer = Answer(
            texts=texts,
            cut=[getattr(choice, "finish_reason", None) == "length" for choice in resp.choices],
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )
        self.stats.add(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        return answer

    def _retry_reason(self, err: Exception) -> str | None:
        """Why `err` deserves a retry, or None when it does not (a 4xx other than 429)."""
        o = self._openai
        if isinstance(err, o.APITimeoutError):
            return "timeout"
        if isinstance(err, o.APIConnectionError):
            return "connection failed"
        if isinstance(err, o.APIStatusError):
            status = err.status_code
            return f"HTTP {status}" if status == 429 or status >= 500 else None
        if isinstance(err, (_MalformedResponse, o.APIResponseValidationError, json.JSONDecodeError, AttributeError)):
            return f"malformed response ({type(err).__name__})"
        return None

    def _final_error(self, err: Exception, reason: str | None, attempt: int) -> EndpointError:
        if reason is None:
            detail = _body_message(getattr(err, "body", None)) or getattr(err, "message", None) or str(err)
            return EndpointError(f"teacher endpoint {self.base_url} refused the request: {_one_line(detail)}")
        return EndpointError(
            f"teacher endpoint {self.base_url}: {reason} after {attempt + 1} attempts "
            f"({_one_line(str(err))}); what was generated is kept, rerun to resume"
        )


class _MalformedResponse(Exception):
    """A 200 answer without the fields a completion needs."""


def _body_message(body: Any) -> str | None:
    """The server's explanation in an error body: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}."""
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    return error.get("message") or error.get("detail") if isinstance(error, dict) else str(error)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
