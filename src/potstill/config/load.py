"""Reading a config: YAML file, then `key=value` overrides, then CLI options; validated in one place.

`load_config(path, overrides, model)` is the one entry point of every command; `load_cache_config` is the
one of `potstill cache build`, which also reads a training config (`cache build -c distill.yaml`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from potstill.config.base import apply_overrides, field_flag, override_key, read_yaml, set_key, validate
from potstill.config.distill import DistillConfig
from potstill.config.stages import CacheConfig, cache_settings_from_distill


def validate_config(
    raw: dict[str, Any],
    model: type[BaseModel] = DistillConfig,
    *,
    given: Mapping | set = (),
    run: bool = False,
    file: str | Path | None = None,
    overridden: list[str] = (),
) -> Any:
    """Validate a nested dict into `model`, turning pydantic's report into a one-line UserError.

    Args:
        raw: the nested config dict.
        model: the config class.
        given: dotted keys whose values came from CLI options (errors about them name the option).
        run: also check what a run needs across sections (`DistillConfig.run_problem`).
        file: the YAML file `raw` was read from (errors about its values name it).
        overridden: the `key=value` overrides applied to `raw` (errors about their keys say `config:`).
    """
    keys = [override_key(o) for o in overridden]
    return validate(raw, model, set(given), {"run": True} if run else None, file, keys)


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    model: type[BaseModel] = DistillConfig,
    *,
    flags: Mapping[str, Any] | None = None,
    run: bool = False,
) -> Any:
    """Read a YAML config (or start empty), apply `key=value` overrides, then CLI options, and validate.

    Args:
        path: YAML file, or None.
        overrides: dotted `key=value` items (YAML scalar syntax).
        model: the config class.
        flags: dotted key -> value of the CLI options given (set last).
        run: also check what a run needs (see `validate_config`).

    Raises:
        UserError: missing/unparsable file, unknown key, or bad value (one line).
    """
    raw = apply_overrides(read_yaml(path), list(overrides))
    for key, value in (flags or {}).items():
        set_key(raw, key, value)
    return validate_config(raw, model, given=set(flags or {}), run=run, file=path, overridden=list(overrides))


def is_distill_config(raw: Mapping[str, Any]) -> bool:
    """A training config has a `model` section (or `loss` / `train`)."""
    return isinstance(raw.get("model"), dict) or any(key in raw for key in ("loss", "train"))


def load_cache_config(
    path: str | Path | None, overrides: list[str] = (), *, flags: Mapping[str, Any] | None = None
) -> CacheConfig:
    """The CacheConfig of `potstill cache build -c FILE key=value ... --option ...`.

    FILE is a cache config (flat CacheConfig keys) or a training config (DistillConfig). With a training
    config, overrides of its sections (`loss.temperature=2`) apply to it, the other overrides and the options
    set cache-only keys (k, targets, encoding, ...), and every setting the run decides (see
    `stages.DERIVED`) comes from it, so the cache cannot disagree with the run.

    Raises:
        UserError: as `load_config`; a training config without teacher or data; an override or option that
            contradicts the training config.
    """
    raw = read_yaml(path)
    flags = dict(flags or {})
    if not is_distill_config(raw):
        return load_config(path, overrides, CacheConfig, flags=flags)
    sections = set(DistillConfig.model_fields)
    ours = [o for o in overrides if override_key(o).split(".")[0] in sections]
    own = apply_overrides({}, [o for o in overrides if override_key(o).split(".")[0] not in sections])
    run = validate_config(apply_overrides(raw, ours), DistillConfig, file=path, overridden=ours)
    names = {key: field_flag(CacheConfig.model_fields.get(key)) or key for key in flags}
    settings = cache_settings_from_distill(run, {**own, **flags}, names)
    return validate_config(settings, CacheConfig, given=flags)
