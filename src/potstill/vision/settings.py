"""Recipe settings from a YAML file and command-line options (options win), checked field by field.

A vision recipe's settings are a frozen dataclass (`CaptionRecipe`, `ClassifyRecipe`, `CrossmodalRecipe`); its YAML
file is a flat mapping of the same field names (`potstill vision caption --print-config` prints one). An unknown key
or a value of the wrong type is a one-line error naming the file (or option) and the field.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from potstill.config.base import read_yaml
from potstill.errors import UserError


def load_recipe(cls: type, config: Path | None, given: dict[str, Any]):
    """`cls(**fields)` from the YAML file `config` (optional) overridden by `given` (field -> value, None = unset).

    Raises:
        UserError: an unknown field, a value that is not of the field's type.
    """
    raw = read_yaml(config)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"{config}: unknown field {key!r} (expected one of: {', '.join(names)})")
        values[key] = _typed(f"{config}: {key}", hints[key], value)
    for key, value in given.items():
        if value is not None:
            values[key] = _typed(f"--{key.replace('_', '-')}", hints[key], value)
    return cls(**values)


def _typed(where: str, hint, value):
    """The value as the field's type (int, float, str, str | None, tuple[int, ...], tuple[str, ...])."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list such as 0,1,2 (got {value!r})")
        return tuple(_typed(where, args[0], v) for v in value)
    if type(None) in args:  # an optional path or name
        return None if value is None else str(value)
    try:
        if hint is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {hint.__name__} (got {value!r})") from None


def as_yaml(recipe) -> str:
    """The recipe as a YAML mapping (what --config reads)."""
    import yaml

    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(recipe).items()}
    return yaml.safe_dump(fields, sort_keys=False)
