"""`potstill serve`: an OpenAI-compatible HTTP server for a local model (app.py: routes, limits, streaming;
engine.py: generation and scoring; protocol.py: the wire format and errors)."""

from potstill.serve.app import create_app, key_from_env, serve
from potstill.serve.protocol import ServeLimits

__all__ = ["ServeLimits", "create_app", "key_from_env", "serve"]
