"""Teacher-written training data (`potstill generate`): completions, explanations, rationales.

Modes (see docs/generate.md):
- `complete`: the teacher answers each prompt -> `{"prompt", "completion"}` (sequence-level KD);
- `explain`: the teacher explains an input (and its answer) -> `{"prompt", "completion"}` (knowledge imprinting);
- `rationale`: few-shot chain of thought -> `{"input", "rationale", "label"}` (Distilling step-by-step); the
  label is parsed from the output with `label_regex`, and a sample is dropped when no label is found or
  when it disagrees with the row's gold label (`label_field`); drops go to `OUT.dropped.jsonl` with a reason.

Templates are text files with `{field}` placeholders naming fields of the input rows; `{{` and `}}` are
literal braces. A placeholder that no input row has is an error at `template:line`; a row that lacks a
field the template uses is an error at `data:line`. Both are found before anything is generated.

The output is append-only: each input row's samples are written whole (one JSON line each, flushed and
fsynced) as soon as they are known, tagged with `source` (`file:line`) and `sample`. A rerun skips the
(source, sample) pairs already in the output or the dropped file, so an interrupted run resumes to the
same records. SIGTERM or SIGINT lets the row being generated be written, then stops the run (exit 128 + the
signal, one line); a second signal acts at once. Every record carries `provenance` (teacher, backend,
template + hash, params, mode, time).
`OUT.summary.json` (written last) counts rows, written and dropped records, and the endpoint's requests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from potstill.config import GenerateConfig, SamplingConfig, TeacherSourceConfig
from potstill.errors import UserError
from potstill.fileio import jsonl_objects, read_bytes, read_text, write_json_atomic
from potstill.models.specials import end_ids
from potstill.signals import StopSignals

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Template:
    """A prompt template: `text` with `{field}` placeholders; `fields` maps each name to its first line."""

    text: str
    source: str
    fields: dict[str, int]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def render(self, row: dict[str, Any], where: str) -> str:
        """Fill the placeholders from `row`.

        Raises:
            UserError: `where: missing field "x" that TEMPLATE uses` (or a field that is not a scalar).
        """

        def fill(match: re.Match) -> str:
            token = match.group(0)
            if token in ("{{", "}}"):
                return token[0]
            return _scalar(row, match.group(1), where, self.source)

        return _TOKEN.sub(fill, self.text)


def parse_template(text: str, source: str) -> Template:
    """Check a template's syntax and list its fields.

    Raises:
        UserError: `source:line: ...` for a lone brace or a placeholder that is not a field name.
    """
    fields: dict[str, int] = {}
    for match in _TOKEN.finditer(text):
        token, line = match.group(0), text.count("\n", 0, match.start()) + 1
        if token in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise UserError(f"{source}:{line}: lone {token!r}; write {token * 2} for a literal brace")
        if not _NAME.match(match.group(1)):
            raise UserError(
                f"{source}:{line}: bad placeholder {token}; use {{field}} with a field name of the input rows"
            )
        fields.setdefault(match.group(1), line)
    return Template(text=text, source=source, fields=fields)


def load_template(path: str | None, mode: str) -> Template:
    """The template file at `path`, or the built-in one of `mode` (`configs/templates/<mode>.txt`)."""
    if path is None:
        builtin = resources.files("potstill") / "configs" / "templates" / f"{mode}.txt"
        return parse_template(builtin.read_text(encoding="utf-8").rstrip("\n"), f"builtin:{mode}.txt")
    return parse_template(read_text(path, "template file").rstrip("\n"), str(path))


@dataclass(frozen=True)
class Row:
    """One input row: its JSON object and where it came from."""

    data: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_rows(paths: list[str]) -> list[Row]:
    """Input rows of the JSONL files (blank lines skipped).

    Raises:
        UserError: a missing file, a line that is not a JSON object (`file:line`), no rows at all.
    """
    if not paths:
        raise UserError("config: inputs: at least one JSONL file is required")
    rows = []
    for path in paths:
        for number, obj in jsonl_objects(path, "input file"):
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{number}: expected a JSON object with the fields the template uses")
            rows.append(Row(obj, str(path), number))
    if not rows:
        raise UserError(f"{paths[0]}: no input rows")
    return rows


def check_fields(template: Template, rows: list[Row], required: tuple[str, ...] = ()) -> None:
    """Fail before generating: a placeholder no row has (template:line), a row missing a needed field (file:line)."""
    seen = set().union(*(row.data for row in rows))
    for name, line in template.fields.items():
        if name not in seen:
            have = ", ".join(sorted(seen)) or "none"
            raise UserError(f"{template.source}:{line}: unknown placeholder {{{name}}}; the input rows have: {have}")
    for row in rows:
        for name in (*template.fields, *required):
            _scalar(row.data, name, row.where, template.source)


def _scalar(row: dict[str, Any], name: str, where: str, source: str) -> str:
    if name not in row:
        raise UserError(f'{where}: missing field "{name}" that {source} uses')
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f'{where}: field "{name}" must be a string or a number')
    return str(value)


def parse_label(text: str, pattern: str) -> tuple[str, str] | None:
    """Split a chain-of-thought answer into (rationale, label) at the last match of `pattern`.

    Args:
        text: the teacher's output.
        pattern: regex (MULTILINE) whose group 1 is the label, e.g. `the answer is (.+?)\\.?$`.

    Returns:
        (the text before the match, stripped; the label, stripped), or None when nothing matches.
    """
    matches = list(re.finditer(pattern, text, re.MULTILINE))
    if not matches or not matches[-1].group(1).strip():
        return None
    last = matches[-1]
    return text[: last.start()].strip(), last.group(1).strip()


def same_label(a: str, b: str) -> bool:
    """Labels compare case-, space- and trailing-period-insensitively, and numerically when both are numbers."""
    x, y = (" ".join(s.strip().rstrip(".").lower().split()) for s in (a, b))
    try:
        return float(x.replace(",", "")) == float(y.replace(",", ""))
    except ValueError:
        return x == y


# --- backends ------------------------------------------------------------------------------------------------


def sampling_params(s: SamplingConfig) -> dict[str, Any]:
    """Sampling parameters as sent to an endpoint (and keyed in the cache)."""
    params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "n": s.n, "seed": s.seed}
    if s.stop:
        params["stop"] = list(s.stop)
    if s.no_repeat_ngram_size:  # only when set: the cache keys of earlier runs stay as they were
        params["no_repeat_ngram_size"] = s.no_repeat_ngram_size
    return params


def hf_generate(
    model, tokenizer, prompts: list[str], params: dict[str, Any]
) -> tuple[list[list[str]], int, int, list[list[bool]]]:
    """Batched generation with a local HF model (left padding), `params` as in `sampling_params`.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer; prompts already carry any chat formatting.
        prompts: B texts.
        params: temperature (0 = greedy), top_p, max_tokens, n, seed, optional stop (list of strings).

    Returns:
        (B lists of n texts, prompt tokens, completion tokens, B lists of n `cut` flags: True where `max_tokens`
        ended the text, not an end token or a stop string).
    """
    import torch

    n, greedy = params.get("n", 1), params.get("temperature", 0.0) == 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=adds_bos(prompts, tokenizer))
    finally:
        tokenizer.padding_side = side
    torch.manual_seed(params.get("seed", 0))
    with torch.no_grad():
        out = model.generate(**enc.to(model.device), **generation_kwargs(params, tokenizer))
    new = out[:, enc["input_ids"].shape[1] :]
    raw = tokenizer.batch_decode(new, skip_special_tokens=True)
    texts = [cut_at_stop(t, params.get("stop")) for t in raw]
    ends = torch.tensor(end_ids(model, tokenizer), dtype=new.dtype, device=new.device)
    ended = torch.isin(new, ends).any(dim=1).tolist()
    cut = [not e and t == r for e, t, r in zip(ended, texts, raw, strict=True)]
    rows = range(len(prompts))
    per_prompt, cuts = (
        ([[texts[i]] * n for i in rows], [[cut[i]] * n for i in rows])
        if greedy
        else ([texts[i * n : (i + 1) * n] for i in rows], [cut[i * n : (i + 1) * n] for i in rows])
    )
    n_new = int((new != pad).sum()) if pad is not None else new.numel()
    return per_prompt, int(enc["attention_mask"].sum()), n_new, cuts


def generation_kwargs(params: dict[str, Any], tokenizer) -> dict[str, Any]:
    """`model.generate` arguments for sampling `params` (greedy at temperature 0: one sequence per prompt, which the
    caller repeats n times; else n samples per prompt, top_p, and HF's stop-string criterion when there are stops)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"max_new_tokens": params.get("max_tokens", 16), "pad_token_id": pad, "top_k": None}
    if params.get("temperature", 0.0) == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=params["temperature"], top_p=params.get("top_p", 1.0))
        kwargs["num_return_sequences"] = params.get("n", 1)
    if params.get("stop"):  # end early once every sequence has a stop string (cut off exactly by `cut_at_stop`)
        kwargs.update(stop_strings=list(params["stop"]), tokenizer=tokenizer)
    if params.get("no_repeat_ngram_size"):
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([NoRepeatNewNgram(params["no_repeat_ngram_size"])])
    return kwargs


class NoRepeatNewNgram:
    """A logits processor that bans every token that would repeat an n-gram of the sequence's new tokens.

    Unlike transformers' `no_repeat_ngram_size`, the prompt's n-grams do not count: an answer may quote its prompt
    (a help-desk answer repeats the package's description) but not loop on itself. One instance per `generate`
    call: its first call sees the (left-padded) prompts only, so their width is where the new tokens start.
    """

    def __init__(self, n: int):
        self.n, self.start = n, None

    def __call__(self, input_ids, scores):
        """input_ids [B, L], scores [B, V] -> scores with the banned tokens at -inf."""
        n = self.n
        self.start = input_ids.shape[1] if self.start is None else self.start
        for row, seq in enumerate(input_ids[:, self.start :].tolist()):
            head = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == head}
            scores[row, sorted(banned)] = float("-inf")
        return scores


def adds_bos(prompts: list[str], tokenizer) -> bool:
    """Let the tokenizer add its special tokens unless the text already starts with them (chat templates do)."""
    bos = tokenizer.bos_token
    return not (bos and prompts and prompts[0].startswith(bos))


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Text up to the first stop string (HF generate stops late, after the token that completes it)."""
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text


def chat_prompt(tokenizer, prompt: str, system: str | None, where: str) -> str:
    """`prompt` as one user turn (after an optional system turn) in the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: teacher.chat=true but this model has no chat template (not an instruct model)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class LocalBackend:
    """A local HF model (or GGUF) generating in batches of `teacher.batch_size`."""

    def __init__(self, cfg: TeacherSourceConfig, sampling: SamplingConfig):
        from potstill.models.load import load_model

        self.model, self.tokenizer = load_model(cfg.model, dtype=cfg.dtype)
        if cfg.chat:
            chat_prompt(self.tokenizer, "", cfg.system, cfg.model)  # fails early when there is no template
        self.cfg, self.params = cfg, sampling_params(sampling)
        self.name = str(cfg.model)
        self.stats: dict[str, int] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def answers(self, prompts: list[str]) -> Iterator[tuple[list[str], list[bool]]]:
        """Per prompt: its n texts and their `cut` flags (see `hf_generate`)."""
        size = self.cfg.batch_size
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            if self.cfg.chat:
                batch = [chat_prompt(self.tokenizer, p, self.cfg.system, self.cfg.model) for p in batch]
            texts, n_in, n_out, cuts = hf_generate(self.model, self.tokenizer, batch, self.params)
            self.stats["requests"] += len(batch)
            self.stats["prompt_tokens"] += n_in
            self.stats["completion_tokens"] += n_out
            yield from zip(texts, cuts, strict=True)


class EndpointBackend:
    """An OpenAI-compatible endpoint (see `potstill.teacher.endpoint`)."""

    def __init__(self, cfg: TeacherSourceConfig, sampling: SamplingConfig):
        from potstill.models.load import cache_dir
        from potstill.teacher.endpoint import EndpointClient

        if not cfg.base_url:
            raise UserError("config: teacher.base_url: required for teacher.backend=endpoint")
        if sampling.no_repeat_ngram_size:
            raise UserError(
                "config: sampling.no_repeat_ngram_size: local backend only (an OpenAI endpoint has no such"
                " parameter); set it to 0 or use teacher.backend=local"
            )
        self.cfg, self.params = cfg, sampling_params(sampling)
        self.client = EndpointClient.from_settings(cfg, cache_dir=cache_dir() / "requests" if cfg.cache else None)
        self.name = f"{cfg.model}@{cfg.base_url}"

    @property
    def stats(self) -> dict[str, int]:
        return self.client.stats.as_dict()

    def answers(self, prompts: list[str]) -> Iterator[tuple[list[str], list[bool]]]:
        """Per prompt: its n texts and their `cut` flags (finish_reason "length")."""
        from potstill.teacher.endpoint import make_request

        requests = (make_request(p, self.params, self.cfg.chat, self.cfg.system) for p in prompts)
        for answer in self.client.map(requests):
            yield answer.texts, answer.cut


# --- the run ---------------------------------------------------------------------------------------------------


def run_generate(cfg: GenerateConfig) -> Path:
    """Generate records per `cfg` into `cfg.output` (resuming it), then write `OUTPUT.summary.json`.

    Returns:
        The output path.

    Raises:
        UserError: bad template or inputs, missing API key, a model without a chat template asked for chat,
            an endpoint still failing after its retries (records written so far are kept).
    """
    template = load_template(cfg.template, cfg.mode)
    rows = read_rows(cfg.inputs)
    check_fields(template, rows, required=("input",) if cfg.mode == "rationale" else ())
    out = Path(cfg.output)
    dropped_path = out.with_name(out.name + ".dropped.jsonl")
    if cfg.overwrite:
        for path in (out, dropped_path):
            path.unlink(missing_ok=True)
    done = _done(out) | _done(dropped_path)
    n = cfg.sampling.n
    pending = [row for row in rows if any((row.where, i) not in done for i in range(n))]
    backend = (
        EndpointBackend(cfg.teacher, cfg.sampling)
        if cfg.teacher.backend == "endpoint"
        else LocalBackend(cfg.teacher, cfg.sampling)
    )
    provenance = {
        "teacher": backend.name,
        "backend": cfg.teacher.backend,
        "template": f"{template.source}#{template.digest}",
        "params": sampling_params(cfg.sampling)
        | {"chat": cfg.teacher.chat}
        | ({"dtype": cfg.teacher.dtype} if cfg.teacher.backend == "local" else {}),
        "mode": cfg.mode,
    }
    counts: Counter = Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM / SIGINT: the row being generated is finished and written, then the run stops (the rerun resumes)
    with StopSignals() as stop, _Appender(out) as kept, _Appender(dropped_path) as dropped:
        prompts = [template.render(row.data, row.where) for row in pending]
        answers = zip(pending, prompts, backend.answers(prompts), strict=False)
        for index, (row, prompt, (texts, cuts)) in enumerate(answers, start=1):
            stamp = provenance | {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            keep, drop = [], []
            for i, (text, cut) in enumerate(zip(texts, cuts, strict=True)):
                if (row.where, i) in done:
                    continue
                record, reason = _record(cfg, row, prompt, text, cut)
                counts["cut"] += cut
                record |= {"source": row.where, "sample": i, "provenance": stamp}
                (drop if reason else keep).append(record | ({"reason": reason} if reason else {}))
                counts[reason or "written"] += 1
            dropped.write(drop)  # dropped first: a kill in between re-asks only the kept samples (from the cache)
            kept.write(keep)
            if stop.signum and index < len(pending):
                rows_done = len(rows) - len(pending) + index
                raise stop.stopped(f"after input row {row.where} ({rows_done} of {len(rows)} rows done in {out})")
    summary = {
        "output": str(out),
        "rows": len(rows),
        "resumed_rows": len(rows) - len(pending),
        "written": counts.pop("written", 0),
        "cut": counts.pop("cut", 0),
        "dropped": dict(counts),
        "teacher": backend.stats,
    }
    write_json_atomic(out.with_name(out.name + ".summary.json"), summary)
    return out


def _record(cfg: GenerateConfig, row: Row, prompt: str, text: str, cut: bool) -> tuple[dict[str, Any], str | None]:
    """The output record of one sample, and the reason to drop it (None: keep). A completion that `max_tokens` cut
    is marked `"cut": true`, so that training scores no end token after it (`potstill.data.sources`)."""
    if cfg.mode != "rationale":
        record = {"prompt": prompt, "completion": text} | ({"cut": True} if cut else {})
        if isinstance(row.data.get("domain"), str):
            record["domain"] = row.data["domain"]
        return record, None
    parsed = parse_label(text, cfg.label_regex)
    if parsed is None:
        return {"input": str(row.data["input"]), "output": text}, "no_label"
    rationale, label = parsed
    record = {"input": str(row.data["input"]), "rationale": rationale, "label": label}
    gold = row.data.get(cfg.label_field)
    if gold is not None and not same_label(label, str(gold)):
        return record | {"gold": str(gold)}, "label_mismatch"
    return record, None


def _done(path: Path) -> set[tuple[str, int]]:
    """(source, sample) pairs already in an output file.

    The file is checked whole before anything is changed: a file with a line that is not one of our records is
    refused untouched. Only then is a torn last line (a kill mid-write: no final newline, not valid JSON) cut off.
    """
    if not path.exists():
        return set()
    data = read_bytes(path, "output file")
    whole = data[: data.rfind(b"\n") + 1]
    torn = data[len(whole) :]
    refuse = f"{path}:{{}}: not a potstill generate record; use a new output or overwrite=true"
    done = set()
    for number, line in enumerate(whole.split(b"\n"), start=1):
        record = _source_sample(line)
        if record is None and line.strip():
            raise UserError(refuse.format(number))
        done.add(record)
    if torn.strip():
        record = _source_sample(torn)
        if record is not None:  # a whole record without its newline (the file was edited): end its line
            done.add(record)
            with open(path, "ab") as fh:
                fh.write(b"\n")
        elif _parses(torn) or not torn.startswith(b'{"'):
            raise UserError(refuse.format(whole.count(b"\n") + 1))
        else:
            with open(path, "r+b") as fh:
                fh.truncate(len(whole))
    done.discard(None)
    return done


def _source_sample(line: bytes) -> tuple[str, int] | None:
    """(source, sample) of one of our output lines, None for anything else."""
    try:
        rec = json.loads(line)
        return (rec["source"], int(rec["sample"])) if isinstance(rec["source"], str) else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


class _Appender:
    """Append JSON lines to a file; each call writes its records in one write, then flush + fsync."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None

    def __enter__(self) -> _Appender:
        return self

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.fh is None:
            self.fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()
