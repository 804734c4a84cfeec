"""`potstill serve MODEL_DIR`: an OpenAI-compatible HTTP server for a local model (teacher or distilled student).

Endpoints: `GET /v1/models`; `POST /v1/completions` (prompt: text, texts, token ids or lists of them; `echo`,
`logprobs` as vLLM serves them, so `potstill serve` can be the scoring teacher of an on-policy run); `POST
/v1/chat/completions` (messages through the model's chat template; 400 when it has none). Both stream (SSE, `stream:
true`, with `stream_options.include_usage`) and take `max_tokens`, `temperature` (0 = greedy), `top_p`, `n`, `seed`,
`stop`.

One model call runs at a time (`Gate`): while it runs, up to `max_queue` requests wait their turn (FIFO), the next
one is answered 429 and one that waited `queue_timeout` seconds 503, both with `Retry-After`. The model runs in a
worker thread, so the event loop keeps answering (`/v1/models`, errors, queued clients). A streaming client that
goes away stops its generation at the next token; a request whose client left while it waited is not run. Every bad
request gets a 4xx in OpenAI's error shape (`protocol.ApiError`), an unexpected failure a 500 with one line and no
traceback (the traceback goes to the log). `app.state.requests` counts the requests that reached the model,
`app.state.tokens` the tokens it generated.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.serve.engine import Engine, Sequence, TokenLogprobs
from potstill.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    ServeLimits,
    envelope,
    new_id,
    parse,
    usage,
)

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # the legacy completions API's default max_tokens


class Gate:
    """One model call at a time, at most `max_queue` waiting for it, none waiting longer than `queue_timeout`."""

    def __init__(self, limits: ServeLimits):
        self.limits, self.waiting = limits, 0
        self.lock: asyncio.Lock | None = None  # made in the server's event loop

    async def enter(self) -> None:
        """Wait for the model (the caller then owns it until `release`).

        Raises:
            ApiError: 429 when the queue is full, 503 when the turn did not come in time (both with Retry-After).
        """
        self.lock = self.lock or asyncio.Lock()
        if self.lock.locked() and self.waiting >= self.limits.max_queue:
            raise ApiError(429, f"server busy: {self.waiting} requests already wait for the model (--max-queue"
                           f" {self.limits.max_queue}); retry later", code="queue_full", retry_after=1)  # fmt: skip
        if not self.lock.locked() and not self.waiting:  # a free model: no wait, whatever the timeout
            await self.lock.acquire()
            return
        self.waiting += 1
        try:
            await asyncio.wait_for(self.lock.acquire(), self.limits.queue_timeout)
        except TimeoutError:
            wait = self.limits.queue_timeout
            raise ApiError(503, f"server overloaded: no turn at the model within {wait:g} s (--queue-timeout);"
                           " retry later", code="queue_timeout", retry_after=1) from None  # fmt: skip
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.lock.release()


def run_in_thread(gate: Gate, work: Callable[[Callable[[tuple], None]], Any]) -> asyncio.Queue:
    """Run `work(put)` in a thread while holding the gate (entered by the caller), released when it ends.

    `work` reports with `put(event)`; the queue then receives ("done", its result) or ("error", ApiError).
    """
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(item: tuple) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def target() -> None:
        try:
            put(("done", work(put)))
        except ApiError as err:
            put(("error", err))
        except Exception:  # noqa: BLE001 - the client gets one line, the log the traceback
            log.exception("potstill serve: the model call failed")
            put(("error", ApiError(500, "internal server error while running the model (see the server's log)")))
        finally:
            loop.call_soon_threadsafe(gate.release)  # after the last event: the queue order is kept

    threading.Thread(target=target, name="potstill-serve-model", daemon=True).start()
    return queue


async def read_json(request, limit: int) -> Any:
    """The request's JSON body, read up to `limit` bytes.

    Raises:
        ApiError: 413 for a larger body, 400 for one that is not JSON.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not JSON ({err})") from None


def create_app(
    model_dir: str | Path, name: str | None = None, limits: ServeLimits | None = None, dtype: str = "float32"
):
    """A FastAPI app serving the model at `model_dir` under the name `name` (default: the directory name)."""
    from potstill.models.load import load_model

    model, tokenizer = load_model(model_dir, dtype)
    return build_app(Engine(model, tokenizer), name or Path(model_dir).name, limits or ServeLimits())


def build_app(engine: Engine, model_name: str, limits: ServeLimits):
    """The app of `create_app` around a loaded `engine`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title=f"potstill serve {model_name}")
    app.state.requests = app.state.tokens = 0
    gate = Gate(limits)

    def error(status: int, message: str, headers=None):
        return JSONResponse(ApiError(status, message).body, status_code=status, headers=headers)

    app.add_exception_handler(ApiError, lambda _, e: JSONResponse(e.body, status_code=e.status, headers=e.headers))
    app.add_exception_handler(HTTPException, lambda _, e: error(e.status_code, str(e.detail), e.headers))
    app.add_exception_handler(RequestValidationError, lambda _, e: error(400, _first_error(e.errors())))
    app.add_exception_handler(Exception, lambda _, e: error(500, "internal server error (see the server's log)"))

    def authorize(request: Request) -> None:
        if limits.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), limits.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def admit(req: Sampling, prompts: int) -> None:
        """Checks that need no tokenizer (before the request waits for the model)."""
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model {req.model!r} does not exist here; this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if prompts * req.n > limits.max_sequences:
            raise ApiError(400, f"n: {prompts} prompts x n {req.n} = {prompts * req.n} sequences, more than the"
                           f" limit of {limits.max_sequences} (--max-sequences)", param="n")  # fmt: skip
        if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {req.max_tokens} is over the limit of {limits.max_tokens}"
                           " (--max-tokens)", param="max_tokens")  # fmt: skip

    def checked_ids(prompt: str | list[int], what: str, param: str = "prompt") -> list[int]:
        """The token ids of a prompt (`what` names it in errors), checked against the vocabulary and the limit."""
        ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise ApiError(400, f"{what} has no tokens", param=param)
        if any(t < 0 or t >= engine.vocab_size for t in ids):
            raise ApiError(400, f"{what}: token ids must lie in [0, {engine.vocab_size})", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"{what} has {len(ids)} tokens, more than the limit of {limits.max_prompt_tokens}"
                           " (--max-prompt-tokens)", param=param)  # fmt: skip
        return ids

    def budget(ids: list[list[int]], asked: int | None, default: int) -> int:
        """max_tokens of a request: as asked (else `default`), checked against the model's context."""
        longest = max(len(p) for p in ids)
        room = engine.context - longest if engine.context else limits.max_tokens
        max_tokens = min(default, room) if asked is None else asked
        if max_tokens > room or room <= 0:
            raise ApiError(400, f"max_tokens: a prompt of {longest} tokens + {max_tokens} new tokens exceeds the"
                           f" model's context of {engine.context} tokens", param="max_tokens")  # fmt: skip
        return max_tokens

    def generate(ids: list[list[int]], req: Sampling, max_tokens: int, emit, cancel) -> list[Sequence]:
        app.state.requests += 1
        if max_tokens == 0:  # echo / scoring only
            return [Sequence(finish="length") for _ in range(len(ids) * req.n)]
        seqs = engine.generate(ids, req.params(max_tokens), emit, cancel)
        app.state.tokens += sum(len(s.tokens) for s in seqs)
        return seqs

    async def run(request, work, stream_of=None):
        """`work` under the gate; the finished result, or (stream_of given) an SSE response of its events."""
        await gate.enter()
        if await request.is_disconnected():  # the client gave up while it waited: nothing to run for it
            gate.release()
            raise ApiError(400, "the client went away while its request waited for the model")
        queue = run_in_thread(gate, work)
        first = await queue.get()
        if first[0] == "error":
            raise first[1]
        if stream_of is None:
            while first[0] != "done":
                first = await queue.get()
                if first[0] == "error":
                    raise first[1]
            return first[1]
        return StreamingResponse(stream_of(first[1], queue), media_type="text/event-stream")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "potstill",
                                            "max_model_len": engine.context}]}  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, limits.max_body_bytes))
        prompts, k = req.prompts(), req.logprobs
        admit(req, len(prompts))
        if k is not None and k > limits.max_logprobs:
            raise ApiError(400, f"logprobs: {k} is over the limit of {limits.max_logprobs} (--max-logprobs)",
                           param="logprobs")  # fmt: skip
        if k is not None and req.stream:
            raise ApiError(400, "logprobs: not available when streaming; ask without stream", param="logprobs")
        cancel = threading.Event()

        def work(put):
            ids = [checked_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
            max_tokens = budget(ids, req.max_tokens, DEFAULT_COMPLETION_TOKENS)
            put(("ready", ids))
            emit = (lambda i, d, f: put(("delta", i, d, f))) if req.stream else (lambda *_: None)
            seqs = generate(ids, req, max_tokens, emit, cancel)
            rows = [ids[i // req.n] + s.tokens for i, s in enumerate(seqs)]
            return ids, seqs, None if k is None else engine.logprobs(rows, k)

        def echo(i: int, ids: list[list[int]]) -> str:
            return "" if not req.echo else prompts[i] if isinstance(prompts[i], str) else engine.decode(ids[i])

        if not req.stream:
            ids, seqs, scores = await run(request, work)
            choices = []
            for i, seq in enumerate(seqs):
                prompt = ids[i // req.n]
                lp = None if scores is None else logprobs_block(engine, prompt + seq.tokens, scores[i],
                                                                0 if req.echo else len(prompt),
                                                                req.return_tokens_as_token_ids)  # fmt: skip
                text = echo(i // req.n, ids) + seq.sent
                choices.append({"index": i, "text": text, "finish_reason": seq.finish, "logprobs": lp})
            return envelope("text_completion", model_name, choices, _usage(ids, seqs))

        def chunk(i, text, finish, rid):
            choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
            return envelope("text_completion", model_name, [choice], None, rid)

        def openers(ids, rid):
            return [chunk(i, echo(i // req.n, ids), None, rid) for i in range(len(ids) * req.n) if req.echo]

        return await run(request, work, lambda ids, q: sse(ids, q, req, cancel, openers, chunk, "text_completion"))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Any:
        req = parse(ChatRequest, await read_json(request, limits.max_body_bytes))
        admit(req, 1)
        if req.max_completion_tokens is not None and req.max_completion_tokens > limits.max_tokens:
            raise ApiError(400, f"max_completion_tokens: {req.max_completion_tokens} is over the limit of"
                           f" {limits.max_tokens} (--max-tokens)", param="max_completion_tokens")  # fmt: skip
        if req.logprobs:
            raise ApiError(400, "logprobs: not served for chat; use /v1/completions with echo", param="logprobs")
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {model_name} has no chat template (not chat-capable); use /v1/completions")
        cancel = threading.Event()

        def work(put):
            messages = [m.model_dump() for m in req.messages]
            try:
                text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # noqa: BLE001 - a template's own refusal (jinja raise_exception) or a bad role
                raise ApiError(400, f"messages: the chat template refused them ({err})", param="messages") from None
            ids = [checked_ids(text, "messages (in the chat template)", "messages")]
            asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            max_tokens = budget(ids, asked, limits.max_tokens)
            put(("ready", ids))
            emit = (lambda i, d, f: put(("delta", i, d, f))) if req.stream else (lambda *_: None)
            return ids, generate(ids, req, max_tokens, emit, cancel)

        if not req.stream:
            ids, seqs = await run(request, work)
            choices = [{"index": i, "message": {"role": "assistant", "content": s.sent}, "finish_reason": s.finish,
                        "logprobs": None} for i, s in enumerate(seqs)]  # fmt: skip
            return envelope("chat.completion", model_name, choices, _usage(ids, seqs))

        def chunk(i, text, finish, rid, delta=None):
            delta = delta if delta is not None else {"content": text} if text or not finish else {}
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            return envelope("chat.completion.chunk", model_name, [choice], None, rid)

        def openers(ids, rid):
            return [chunk(i, "", None, rid, {"role": "assistant", "content": ""}) for i in range(req.n)]

        kind = "chat.completion.chunk"
        return await run(request, work, lambda ids, q: sse(ids, q, req, cancel, openers, chunk, kind))

    async def sse(ids, queue, req, cancel, openers, chunk, kind) -> AsyncIterator[str]:
        """Server-sent events: the openers, one chunk per text delta, the usage (if asked), then [DONE]."""
        rid = new_id()
        try:
            for opener in openers(ids, rid):
                yield _event(opener)
            while True:
                item = await queue.get()
                if item[0] == "delta":
                    yield _event(chunk(item[1], item[2], item[3], rid))
                elif item[0] == "error":
                    yield _event(item[1].body)
                    break
                elif item[0] == "done":
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield _event(envelope(kind, model_name, [], _usage(ids, item[1][1]), rid))
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that went away stops the generation at its next token

    return app


def logprobs_block(engine: Engine, ids: list[int], scores: TokenLogprobs, start: int, as_ids: bool) -> dict:
    """The legacy completions `logprobs` of tokens `ids[start:]` (vLLM's format; position 0 has none).

    Each `top_logprobs` entry holds the k most probable tokens and the actual one; tokens are rendered as
    `token_id:N` (`as_ids`, vLLM's `return_tokens_as_token_ids`) or as their decoded text.
    """
    render = (lambda t: f"token_id:{t}") if as_ids else (lambda t: engine.tokenizer.decode([t]))
    tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
    for p in range(start, len(ids)):
        token = render(ids[p])
        tokens.append(token)
        offsets.append(offset)
        offset += len(engine.tokenizer.decode([ids[p]]))
        if p == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        value = float(scores.token[p - 1])
        top = {render(int(t)): float(v) for v, t in zip(scores.top[p - 1], scores.top_ids[p - 1], strict=True)}
        top.setdefault(token, value)
        token_logprobs.append(value)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _usage(ids: list[list[int]], seqs: list[Sequence]) -> dict[str, int]:
    return usage(sum(len(p) for p in ids), sum(len(s.tokens) for s in seqs))


def _first_error(errors: list[dict]) -> str:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def key_from_env(env_name: str | None) -> str | None:
    """The API key clients must send, from the environment variable `env_name` (None: no authentication).

    Raises:
        UserError: the variable is not set or empty.
    """
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value:
        raise UserError(f"--api-key-env: environment variable {env_name} is not set (or empty); export it first")
    return value


def serve(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    limits: ServeLimits | None = None,
    dtype: str = "float32",
) -> None:
    """Serve `model_dir` until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("potstill serve needs the [generate] extra: pip install 'potstill[generate]'") from None
    from potstill.models.load import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    limits = limits or ServeLimits()
    app = create_app(model_dir, name, limits, dtype)
    if limits.api_key is None and not _is_loopback(host):
        print(f"potstill serve: warning: listening on {host} without an API key (--api-key-env)", file=sys.stderr)
    print(f"potstill serve: {name or Path(model_dir).name} on http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
