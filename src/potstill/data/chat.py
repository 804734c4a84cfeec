"""Chat records rendered with a chat template into prompt/completion records.

A chat record `{"messages": [..., {"role": "assistant", "content": ANSWER}]}` becomes one prompt/completion row
through the tokenizer's chat template (the student's, or the teacher's copied into it: `model.chat_template`):

- prompt = the template applied to the turns before the answer, with `add_generation_prompt=True` (what a chat
  model sees before it answers);
- completion = what the template writes for the whole conversation after that prompt: the answer and the
  template's end-of-turn token (e.g. `ANSWER<|im_end|>`); whatever the template writes after that token (a
  newline) is dropped, so the completion ends where the student should stop. With an end-of-turn token the record
  is `templated` and no `<eos>` is appended; a template without one gets the `<eos>`, like any prompt/completion row.
  A record marked `"cut": true` (a length limit cut its answer) keeps neither: its completion is the answer alone.

A `<bos>` the template writes at the start of the prompt is dropped: `data.add_bos` puts it there, as for every row.
"""

from __future__ import annotations

from dataclasses import replace

from potstill.data.sources import Record, read_many
from potstill.errors import UserError

_PROBE = "potstill-probe-answer"  # an assistant message whose end shows what the template writes after it


def end_of_turn(tokenizer, template: str | None = None) -> str | None:
    """The special token a chat template writes right after an assistant message, or None (no template, or none).

    Args:
        tokenizer: an HF tokenizer.
        template: the template to use (default: the tokenizer's own).
    """
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange has no usable end-of-turn
        return None
    after = text[text.rfind(_PROBE) + len(_PROBE) :]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return next((tokenizer.convert_ids_to_tokens(i) for i in ids if i in special), None)


def holds_chat(paths: list[str]) -> bool:
    """Whether any of the JSONL files holds a chat record (they are read once more by whoever trains on them)."""
    return bool(paths) and any(r.messages is not None for r in read_many(paths))


def render_chat(records: list[Record], tokenizer) -> list[Record]:
    """Chat records -> prompt/completion records through `tokenizer`'s chat template (others are kept as they are).

    Raises:
        UserError: a chat record and a tokenizer without a chat template, a record the template cannot render, or a
            template whose rendering of the prompt is not a prefix of the whole conversation (`file:line`).
    """
    chats = [r for r in records if r.messages is not None]
    if not chats:
        return records
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{chats[0].path}:{chats[0].line}: a chat record, but the student's tokenizer has no chat template;"
            " set model.chat_template=teacher to use the teacher's, or give prompt/completion rows"
        )
    eot = end_of_turn(tokenizer)
    return [r if r.messages is None else _render(r, tokenizer, eot) for r in records]


def _render(record: Record, tokenizer, eot: str | None) -> Record:
    where = f"{record.path}:{record.line}"
    turns = [{"role": role, "content": content} for role, content in record.messages]
    try:
        prompt = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as err:  # noqa: BLE001 - jinja raises its own errors (e.g. "roles must alternate")
        message = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{where}: the chat template cannot render this record ({message})") from None
    if not full.startswith(prompt):
        raise UserError(
            f"{where}: the chat template renders the turns before the answer differently when the answer follows"
            " (not a prefix), so the answer cannot be cut out; give this row as prompt/completion"
        )
    completion, answer = full[len(prompt) :], turns[-1]["content"]
    at = completion.find(answer) + len(answer) if answer in completion else -1  # where the answer ends
    end = completion.find(eot, at) if eot and at >= 0 else -1
    if record.cut:  # a length limit cut the answer: it does not end here, so nothing after it is a target
        if at < 0:
            raise UserError(f'{where}: "cut": the chat template changes the answer, so its cut end cannot be found')
        completion, end = completion[:at], -1
    elif end >= 0:
        completion = completion[: end + len(eot)]
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return replace(record, prompt=prompt, completion=completion, messages=None, templated=end >= 0)
