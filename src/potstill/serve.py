"""`potstill serve MODEL_DIR`: an OpenAI-compatible HTTP server for a local model (teacher or distilled student).

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt: a string or a list of strings) and
`POST /v1/chat/completions` (messages, through the model's chat template; 400 when it has none).
Sampling fields: `max_tokens`, `temperature` (0 = greedy), `top_p`, `n`, `seed`, `stop`. Generation runs
one request at a time (one model, one lock); `app.state.requests` counts the generation requests served.
Meant for 127.0.0.1 (tests, local pipelines): there is no authentication.
"""

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from potstill.errors import UserError


def create_app(model_dir: str | Path, name: str | None = None):
    """A FastAPI app serving the model at `model_dir` under the name `name` (default: the directory name).

    Returns:
        The app; `app.state.requests` counts completion + chat requests.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    from potstill.models.load import load_model
    from potstill.teacher.generate import hf_generate

    model, tokenizer = load_model(model_dir)
    model_name = name or Path(model_dir).name
    lock = threading.Lock()
    app = FastAPI(title=f"potstill serve {model_name}")
    app.state.requests = 0

    class Sampling(BaseModel):
        model: str | None = None
        max_tokens: int = Field(default=16, ge=1)
        temperature: float = Field(default=1.0, ge=0)
        top_p: float = Field(default=1.0, gt=0, le=1)
        n: int = Field(default=1, ge=1)
        seed: int | None = None
        stop: str | list[str] | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str]

    class Message(BaseModel):
        role: str
        content: str

    class ChatRequest(Sampling):
        messages: list[Message]

    def run(prompts: list[str], req: Sampling) -> tuple[list[list[str]], dict[str, int]]:
        params = req.model_dump(exclude={"model", "prompt", "messages"})
        params["seed"] = params["seed"] or 0
        params["stop"] = [params["stop"]] if isinstance(params["stop"], str) else params["stop"]
        with lock:
            app.state.requests += 1
            texts, n_in, n_out = hf_generate(model, tokenizer, prompts, params)
        return texts, {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def envelope(kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": f"potstill-{uuid.uuid4().hex[:12]}",
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage,
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "potstill"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        texts, usage = run(prompts, req)
        flat = [t for per_prompt in texts for t in per_prompt]
        choices = [{"index": i, "text": t, "finish_reason": "length", "logprobs": None} for i, t in enumerate(flat)]
        return envelope("text_completion", choices, usage)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            message = f"model {model_name} has no chat template (not chat-capable); use /v1/completions"
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=400)
        messages = [m.model_dump() for m in req.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts, usage = run([prompt], req)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
            for i, t in enumerate(texts[0])
        ]
        return envelope("chat.completion", choices, usage)

    return app


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Serve `model_dir` until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("potstill serve needs the [generate] extra: pip install 'potstill[generate]'") from None
    uvicorn.run(create_app(model_dir, name), host=host, port=port, log_level="warning")
