"""Chat tokenizers for the tests of chat records and special tokens (tests/data, tests/models, tests/train).

`chat_pair(tokenizer)` returns copies of a tiny tokenizer with the ChatML tokens `<|im_start|>` / `<|im_end|>`
added (same ids in every copy): `base(...)` as a base model has them (no template, `<eos>` its own), `instruct(...)`
as an instruct model (the ChatML template, `<eos>` = `<|im_end|>`).
"""

from __future__ import annotations

import copy

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURN_TOKENS = ["<|im_start|>", "<|im_end|>"]


def with_turn_tokens(tokenizer):
    """A copy of `tokenizer` with the ChatML tokens added as special tokens (no template, its own <eos>)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    return tok


def instruct(tokenizer, template: str = CHATML):
    """An instruct-style copy: ChatML tokens, `template`, and `<eos>` = `<|im_end|>`."""
    tok = with_turn_tokens(tokenizer)
    tok.chat_template = template
    tok.eos_token = "<|im_end|>"
    return tok
