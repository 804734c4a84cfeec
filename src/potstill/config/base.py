"""The config machinery every stage shares: the `Section` base, `key=value` overrides, one-line errors.

A field that a CLI option also sets says so with `json_schema_extra=flag("--k")`: the reference lists the
option, and a bad value that came from it is reported under the option's name (`--k must be >= 1 (got 0)`);
one that came from a file or a `key=value` override under its key (`config: k: must be >= 1 (got 0)`).
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from potstill.errors import UserError
from potstill.fileio import read_text

Dtype = Literal["float32", "bfloat16", "float16"]
CacheTargets = Literal["topk", "sampled", "hidden"]
CacheEncoding = Literal["compact", "lossless"]
LayerSelection = Literal["measured", "even"]
LossName = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"]
"""Weight dtypes a model can be loaded in (`potstill.models.load.DTYPES`)."""
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A random seed: what numpy, torch and `transformers.set_seed` all accept (checked before any model loads)."""


def comma_list(value: Any) -> Any:
    """A comma-separated option, "0, 1,3" -> ["0", "1", "3"]; any other value (a YAML list) is left as it is."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


CommaList = BeforeValidator(comma_list)
"""Marks a tuple field whose value may be given as "a,b,c" (`Annotated[tuple[int, ...], CommaList]`)."""
Seeds = Annotated[tuple[Seed, ...], CommaList, Field(min_length=1)]
"""One or more seeds: a YAML list or an option's "0,1"."""


class Section(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated, numbers are numbers.

    Every float of every section (nested lists and dicts included) must be finite (`.inf`, `nan` are refused),
    and a YAML boolean is not a number (`alpha: true` is an error, not 1.0); subclasses get both for free.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None and (
            kind := _bool_for_number(cls.model_fields[info.field_name].annotation, value)
        ):
            raise ValueError(f"must be {kind}, not true/false")
        return value


def _bool_for_number(annotation: Any, value: Any) -> str | None:
    """ "a number" / "an integer" where `value` holds a boolean where `annotation` wants a number, else None.

    Looks into list, tuple and dict values (`seeds: [0, true]`, `weights: {code: true}`), which pydantic would
    otherwise read as 1 without a word.
    """
    if isinstance(value, bool):
        kinds = _leaf_types(annotation)
        if bool not in kinds and Any not in kinds and kinds & {int, float}:
            return "a number" if float in kinds else "an integer"
        return None
    if isinstance(value, (list, tuple, dict)):
        items = value.values() if isinstance(value, dict) else value
        for element in _element_types(annotation, dict if isinstance(value, dict) else list):
            if found := next((k for v in items if (k := _bool_for_number(element, v))), None):
                return found
    return None


def _unwrap(annotation: Any) -> list:
    """The members of a field's annotation (`X | None` -> [X, None]; `Annotated[X, ...]` -> [X])."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _unwrap(a)]
    return [annotation]


def _leaf_types(annotation: Any) -> set:
    """The plain types a field's annotation admits at its top level (`float | Literal['auto']` -> {float, str})."""
    kinds: set = set()
    for member in _unwrap(annotation):
        origin = get_origin(member)
        kinds |= {type(a) for a in get_args(member)} if origin is Literal else {member} if origin is None else set()
    return kinds


def _element_types(annotation: Any, container: type) -> list:
    """The element (for a dict: value) annotations of the list/tuple or dict members of an annotation."""
    found = []
    for member in _unwrap(annotation):
        origin, args = get_origin(member), get_args(member)
        if container is dict and origin is dict and args:
            found.append(args[-1])
        elif container is list and origin in (list, tuple) and args:
            found.append(args[0])
    return found


def flag(name: str) -> dict[str, str]:
    """`json_schema_extra` of a field the CLI option `name` sets: `Field(64, json_schema_extra=flag("--k"))`."""
    return {"flag": name}


def field_flag(info: FieldInfo | None) -> str | None:
    """The CLI option that sets this field, if any."""
    extra = info.json_schema_extra if info is not None else None
    return extra.get("flag") if isinstance(extra, dict) else None


def section_of(annotation: Any) -> type[Section] | None:
    """The Section class a field holds (`X`, `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        found = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return found[0] if found else None
    return None


# ----- overrides and files ----------------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """`key=value` values use YAML scalar syntax: 0.5, true, null, [a, b], 'auto'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def override_key(item: str) -> str:
    """The dotted key of a `key=value` override."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected key=value, e.g. loss.alpha=0.9")
    return item.split("=", 1)[0].strip()


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key "a.b.c", creating sections on the way."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        set_key(raw, override_key(item), _parse_scalar(item.split("=", 1)[1]))
    return raw


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file as a dict ({} for None).

    Raises:
        UserError: missing, unreadable, not UTF-8 or unparsable file, a key given twice in one mapping, or not a
            mapping at the top level.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        raw = yaml.load(read_text(p, "config file"), Loader=_StrictLoader) or {}
    except _DuplicateKey as dup:
        raise UserError(f"{p}:{dup.line}: key {dup.key!r} is given twice in the same section") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping of sections at the top level")
    return raw


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--print-config` shows and run dirs store as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----- one-line errors --------------------------------------------------------------------------------------------

_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_BOUND_CTX = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}
_KINDS = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _locate(model: type[BaseModel], loc: tuple) -> tuple[str, FieldInfo | None]:
    """The dotted config key of an error location and its field (union-member tags dropped)."""
    parts: list[str] = []
    cls: type[BaseModel] | None = model
    info = item = None
    container = False
    for part in loc:
        if cls is not None and isinstance(part, str) and part in cls.model_fields:
            info = cls.model_fields[part]
            parts.append(part)
            cls = section_of(info.annotation)
            container = cls is None and get_origin(info.annotation) in (list, dict)
            item = section_of(get_args(info.annotation)[-1]) if container else None  # a list of sections
        elif container:  # a list index or dict key inside a field, e.g. data.mixing.weights.code
            parts.append(str(part))
            container, cls = False, item
        else:
            break
    return ".".join(parts), info


def _phrase(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {ctx[_BOUND_CTX[kind]]}"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx.get('multiple_of')}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    return error["msg"].removeprefix("Value error, ")


def format_error(
    err: ValidationError,
    model: type[BaseModel],
    given: Collection[str] = (),
    file: str | Path | None = None,
    overridden: Collection[str] = (),
) -> str:
    """pydantic's report as one line naming the key, or the CLI option when the value came from one (`given`).

    The line starts with the config `file` the value came from, or `config:` when there was none or a `key=value`
    override (`overridden`: their dotted keys) set it.
    """
    errors = err.errors()
    first = errors[0]
    key, info = _locate(model, first["loc"])
    if first["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in first["loc"])
    set_here = [o for o in overridden if not key or o == key or o.startswith(f"{key}.") or key.startswith(f"{o}.")]
    where = f"{file}:" if file is not None and not set_here else "config:"
    if first["type"] == "extra_forbidden":
        return f"{where} unknown key {key!r}"
    option = field_flag(info) if key else None
    if first["type"] == "missing":
        return f"{where} {key}: required but missing" + (f" (option {option})" if option else "")
    phrases = [_phrase(e) for e in errors if _locate(model, e["loc"])[0] == key]
    msg = " or ".join([phrases[0], *(p.removeprefix("must be ") for p in phrases[1:] if p != phrases[0])])
    got = first.get("input")
    if isinstance(got, (str, int, float, bool)) and "(got" not in msg:
        msg = f"{msg} (got {got!r})"
    if not key:  # a check across fields (model validator): its message names the fields
        return f"{where} {msg}"
    if option and key in given:
        return f"{option} {msg}" if msg.startswith("must") else f"{option}: {msg}"
    return f"{where} {key}: {msg}"


def validate(
    raw: Mapping[str, Any],
    model: type[BaseModel],
    given: Collection[str] = (),
    context: dict | None = None,
    file: str | Path | None = None,
    overridden: Collection[str] = (),
) -> Any:
    """Validate a nested dict into `model`, turning pydantic's report into a one-line UserError (see `format_error`)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as err:
        raise UserError(format_error(err, model, given, file, overridden)) from None
