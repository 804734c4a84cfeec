"""Typed run configuration: YAML file + `key=value` overrides, validated with one-line errors.

A config is a `DistillConfig` (pydantic). `load_config(path, overrides)` reads the YAML, applies
dotted overrides such as `loss.alpha=0.9` or `train.max_steps=50`, and validates. Unknown keys and
bad values raise `UserError` naming the key and what is allowed, e.g.
`config: loss.beta: must be in [0, 1] (got 1.5)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from potstill.errors import UserError

LOSS_NAMES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Where the student and teacher come from (HF directories)."""

    student: str = Field(description="HF directory of the student (AutoModelForCausalLM + tokenizer)")
    teacher: str | None = Field(default=None, description="HF directory of the teacher; not needed when loss.alpha=0")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LossConfig(_Section):
    """KD objective: alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)."""

    name: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"] = "fkl"
    alpha: float | Literal["auto"] = Field(default=0.5, description="weight of the KD term in [0, 1], or 'auto'")
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature T > 0 for both distributions")
    beta: float = Field(default=0.5, ge=0, le=1, description="jsd interpolation beta in [0, 1] (0 = fkl, 1 = rkl)")
    jsd_scaled: bool = Field(default=False, description="jsd / (beta (1 - beta)): continuous in beta")
    skew: float = Field(default=0.1, ge=0, le=1, description="skl/srkl skew alpha in [0, 1] (DistiLLM uses 0.1)")
    akl_mu: float = Field(default=0.5, ge=0, le=1, description="akl head mass mu in [0, 1]")
    sparse_tail: Literal["renorm", "bucket"] = Field(
        default="bucket",
        description="sparse (top-k) teacher targets: 'bucket' = k ids + one bucket for the rest (matches tail mass),"
        " 'renorm' = both distributions renormalized over the k ids",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1] or 'auto' (got {v})")
        return v


class DataConfig(_Section):
    """Training / evaluation data: JSONL files (text or prompt/completion), packed to seq_len."""

    train: list[str] = Field(default_factory=list, description="JSONL files to train on")
    eval: list[str] = Field(default_factory=list, description="held-out JSONL files (eval.json after training)")
    seq_len: int = Field(default=256, ge=8, description="tokens per packed sequence")
    add_bos: bool = Field(default=True, description="put the tokenizer's <bos> at the start of every sequence")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TrainConfig(_Section):
    """Optimisation and run-directory settings (passed to transformers.TrainingArguments)."""

    output_dir: str = "runs/distill"
    max_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1, description="sequences per device per micro-step")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    seed: int = 0
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    overwrite: bool = Field(default=False, description="replace an existing output_dir instead of resuming")


class DistillConfig(_Section):
    """Everything `potstill distill` needs."""

    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _parse_scalar(text: str) -> Any:
    """`key=value` values use YAML scalar syntax: 0.5, true, null, [a, b], 'auto'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. loss.alpha=0.9")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return raw


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"config: unknown key {key!r}"
    if kind == "missing":
        return f"config: {key}: required but missing"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if isinstance(got, (str, int, float, bool)) and "(got" not in msg:
        msg = f"{msg} (got {got!r})"
    return f"config: {key}: {msg}"


def validate_config(raw: dict[str, Any], model: type[BaseModel] = DistillConfig) -> Any:
    """Validate a nested dict into `model`, turning pydantic's report into a one-line UserError."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] = (), model: type[BaseModel] = DistillConfig) -> Any:
    """Read a YAML config (or start empty), apply overrides, validate.

    Raises:
        UserError: missing/unparsable file, unknown key, or bad value (one line).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{p}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: expected a mapping of sections at the top level")
    return validate_config(apply_overrides(raw, list(overrides)), model)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--print-config` shows and run dirs store as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
