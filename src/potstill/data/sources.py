"""Read training / evaluation corpora: JSON Lines files of text or prompt/completion records, with domains.

One object per line (blank lines are skipped):

- plain text: `{"text": "...", "domain": "code"}`; the loss covers the whole text;
- prompt/completion: `{"prompt": "...", "completion": "...", "domain": "qa"}`; the loss covers the completion only;
- chat: `{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}`: the
  last message, an assistant turn, is the completion; the turns before it are the prompt. Both are rendered with the
  student's chat template when the records are tokenized (`potstill.data.chat`).

`domain` is optional (default `"default"`); so is `"cut": true`, for a completion (or last assistant turn) that a
length limit cut (a generation's max_tokens): no end token is scored after it, since it does not end there. Other
keys are ignored. Every mistake (unreadable file, bad
JSON, a line that is not an object, a missing or non-string field) is a `UserError` naming `file:line`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.fileio import jsonl_objects

DEFAULT_DOMAIN = "default"
_EXPECTED = (
    'expected {"text": str}, {"prompt": str, "completion": str} or {"messages": [{"role": str, "content": str}, ...]},'
    ' with an optional "domain": str and "cut": bool'
)


@dataclass(frozen=True)
class Record:
    """One document of a corpus.

    Exactly one of `text`, the pair (`prompt`, `completion`) or `messages` is set (a chat record becomes a
    prompt/completion one, `templated`, when its template is applied: `potstill.data.chat.render_chat`).

    Attributes:
        text: the document (plain-text records), else None.
        prompt: the unscored context (prompt/completion records), else None.
        completion: the scored continuation (prompt/completion records), else None.
        messages: a chat record's turns ((role, content), ...), the last one the assistant's completion, else None.
        templated: prompt and completion were rendered by a chat template: the completion ends with the
            template's end-of-turn text, so no `<eos>` is appended.
        cut: a length limit cut the scored part: no end token (`<eos>`, end-of-turn) is appended or kept after it.
        domain: the domain name ("default" when the line has none).
        path: the file it came from.
        line: its 1-based line number in that file.
    """

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    templated: bool = False
    cut: bool = False
    domain: str = DEFAULT_DOMAIN
    path: str = ""
    line: int = 0

    @property
    def context(self) -> str:
        """The unscored part (the prompt; "" for plain text)."""
        return self.prompt if self.prompt is not None else ""

    @property
    def scored(self) -> str:
        """The part the loss and the metrics cover (the text, or the completion)."""
        return self.text if self.text is not None else self.completion


def read_jsonl(path: str | Path) -> list[Record]:
    """Read a JSON Lines corpus.

    Args:
        path: a `.jsonl` file, UTF-8, one JSON object per line.

    Returns:
        The records in file order.

    Raises:
        UserError: missing file, invalid UTF-8 or JSON, a line that is not an object, a missing or
            non-string field (each names `file:line`), or a file without any record.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a data file (JSONL)")
    records = [_parse_line(obj, f"{p}:{number}", str(p), number) for number, obj in jsonl_objects(p, "data file")]
    if not records:
        raise UserError(f"{p}: no records (expected one JSON object per line)")
    return records


def read_many(paths: list[str | Path]) -> list[Record]:
    """Read several JSONL files, concatenated in the order given (see `read_jsonl`)."""
    if not paths:
        raise UserError("no data files given")
    return [record for path in paths for record in read_jsonl(path)]


def _parse_line(obj: Any, where: str, path: str, number: int) -> Record:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_json_type(obj)}; {_EXPECTED}")
    domain = _string_field(obj, "domain", where, DEFAULT_DOMAIN)
    if not domain:
        raise UserError(f'{where}: field "domain" is empty; give a name or leave the field out')
    cut = obj.get("cut", False)
    if not isinstance(cut, bool):
        raise UserError(f'{where}: field "cut" must be true or false, got {_json_type(cut)}')
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise UserError(f'{where}: has both "text" and "prompt"/"completion"; {_EXPECTED}')
        return Record(text=_string_field(obj, "text", where), cut=cut, domain=domain, path=path, line=number)
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise UserError(f'{where}: has both "messages" and "prompt"/"completion"; {_EXPECTED}')
        return Record(messages=_messages(obj["messages"], where), cut=cut, domain=domain, path=path, line=number)
    if "prompt" in obj or "completion" in obj:
        prompt = _string_field(obj, "prompt", where)
        completion = _string_field(obj, "completion", where)
        return Record(prompt=prompt, completion=completion, cut=cut, domain=domain, path=path, line=number)
    raise UserError(f'{where}: missing field "text"; {_EXPECTED}')


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A chat record's turns: a list of >= 2 {"role": str, "content": str} objects ending with the assistant's."""
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f'{where}: field "messages" must be a list of at least 2 turns (a prompt and the answer)')
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise UserError(f'{where}: messages[{i}] must be an object {{"role": str, "content": str}}')
        at = f"{where}: messages[{i}]"
        turns.append((_string_field(turn, "role", at), _string_field(turn, "content", at)))
    if turns[-1][0] != "assistant":
        raise UserError(
            f'{where}: the last of "messages" must be the assistant\'s turn (the completion), got role {turns[-1][0]!r}'
        )
    return tuple(turns)


def _string_field(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    """obj[key] as a string; a missing key gives `default`, or an error when there is none."""
    if key not in obj:
        if default is None:
            raise UserError(f'{where}: missing field "{key}"; {_EXPECTED}')
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f'{where}: field "{key}" must be a string, got {_json_type(value)}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape such as "\\ud800" decodes to a lone surrogate
        raise UserError(f'{where}: field "{key}" contains an unpaired surrogate escape (not valid Unicode)') from None
    return value


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
