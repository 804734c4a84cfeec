"""The OpenAI wire format of `potstill serve`: request bodies (validated), limits, errors, response envelopes.

Requests are parsed from the JSON body by hand (`parse`), so every mistake, whatever its kind, is answered with a
4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` (`ApiError`) naming the field.
Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`, `frequency_penalty`, ...).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop strings per request and their length (checked at every step)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server (each excess is a 4xx naming the limit, never a crash).

    Attributes:
        api_key: the key clients must send as `Authorization: Bearer KEY` (None: no authentication).
        max_body_bytes: request body size (413 beyond).
        max_tokens: a request's `max_tokens` (400 beyond).
        max_prompt_tokens: tokens of one prompt (400 beyond; the model's context bounds prompt + max_tokens too).
        max_sequences: prompts x n of one request.
        max_logprobs: `logprobs` (top tokens per position) of one request.
        max_queue: requests waiting for the model while one runs (429 with Retry-After beyond).
        queue_timeout: seconds a request waits for the model before it gets 503 with Retry-After.
    """

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    max_sequences: int = 16
    max_logprobs: int = 20
    max_queue: int = 8
    queue_timeout: float = 60.0


class ApiError(Exception):
    """A request the server answers with an error: HTTP `status` and OpenAI's error body."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, retry_after=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        kind = self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    no_repeat_ngram_size: int = Field(default=0, ge=0)  # not OpenAI's: vLLM-style extra (`extra_body`)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def params(self, max_tokens: int) -> dict[str, Any]:
        """The sampling parameters of `Engine.generate`."""
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "n": self.n,
                "seed": self.seed, "stop": self.stop, "no_repeat_ngram_size": self.no_repeat_ngram_size}  # fmt: skip


class CompletionRequest(Sampling):
    """`/v1/completions`: a prompt (text, texts, token ids or lists of token ids), `echo` and `logprobs` as vLLM."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    return_tokens_as_token_ids: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("a prompt must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a token-id list."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    """`/v1/chat/completions`: messages through the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False


def parse(kind: type[BaseModel], body: Any) -> Any:
    """`body` (parsed JSON) as a `kind` request.

    Raises:
        ApiError: 400 naming the first wrong field and what was expected.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"] if not str(x).startswith(("list[", "str")))
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param or 'body'}: {message}", param=param or None) from None


def envelope(kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None, rid: str = ""):
    """A response (or a stream chunk) of `kind` ("text_completion", "chat.completion", "chat.completion.chunk")."""
    body = {"id": rid or new_id(), "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def new_id() -> str:
    return f"potstill-{uuid.uuid4().hex[:16]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
