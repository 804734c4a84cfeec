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


Dtype = Literal["float32", "bfloat16", "float16"]
"""Weight dtypes a model can be loaded in (`potstill.models.load.DTYPES`)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Where the student and teacher come from (HF directories)."""

    student: str = Field(description="HF directory of the student (AutoModelForCausalLM + tokenizer)")
    teacher: str | None = Field(default=None, description="HF directory of the teacher; not needed when loss.alpha=0")
    dtype: Dtype = Field(default="float32", description="dtype the student's weights are loaded and trained in")
    teacher_dtype: Dtype | None = Field(
        default=None,
        description="dtype of the frozen teacher (null: same as dtype); bfloat16 runs it several times faster on"
        " GPUs and on CPUs with AVX512-BF16/AMX, for ~0.005 nats of KL to its float32 outputs",
    )

    @property
    def teacher_load_dtype(self) -> str:
        """The dtype the teacher is loaded in: `teacher_dtype`, or `dtype` when that is null."""
        return self.teacher_dtype or self.dtype


class LossConfig(_Section):
    """KD objective: alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)."""

    name: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"] = "fkl"
    alpha: float | Literal["auto"] = Field(default=0.5, description="weight of the KD term in [0, 1], or 'auto'")
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature T > 0 for both distributions")
    beta: float = Field(default=0.5, ge=0, le=1, description="jsd interpolation beta in [0, 1] (0 = fkl, 1 = rkl)")
    jsd_scaled: bool = Field(default=False, description="jsd / (beta (1 - beta)): continuous in beta")
    skew: float = Field(default=0.1, ge=0, le=1, description="skl/srkl skew alpha in [0, 1] (DistiLLM uses 0.1)")
    akl_mu: float = Field(default=0.5, ge=0, le=1, description="akl head mass mu in [0, 1]")
    rationale_weight: float = Field(
        default=1.0, ge=0, description="step-by-step recipe: lambda in L_label + lambda * L_rationale"
    )
    sparse_tail: Literal["renorm", "bucket"] = Field(
        default="bucket",
        description="sparse (top-k) teacher targets: 'bucket' = k ids + one bucket for the rest (matches tail mass),"
        " 'renorm' = both distributions renormalized over the k ids",
    )
    fused: bool = Field(
        default=True,
        description="chunked head + loss (losses/fused.py), never [tokens x V] logits; used when the student has a"
        " plain linear head (else the dense path runs)",
    )
    chunk_size: int | None = Field(default=None, ge=1, description="fused loss: tokens per chunk (null = ~2^24/V)")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1] or 'auto' (got {v})")
        return v


class TeacherConfig(_Section):
    """Where the teacher's distributions come from during training."""

    source: Literal["online", "cache"] = Field(
        default="online",
        description="'online' = run model.teacher on every batch; 'cache' = read top-k targets from teacher.cache"
        " (no teacher model in memory)",
    )
    cache: str | None = Field(default=None, description="teacher cache dir (`potstill cache build`), for source=cache")


class MixingConfig(_Section):
    """How training sequences are drawn by domain (`potstill.data.mixing`); DDK re-weights during training."""

    mode: Literal["uniform", "proportional", "fixed", "ddk"] = Field(
        default="ddk", description="uniform, proportional (to data size), fixed (`weights`), or ddk (adaptive)"
    )
    weights: dict[str, float] = Field(default_factory=dict, description="domain -> weight (>= 0) for mode fixed")
    interval: int = Field(default=100, gt=0, description="ddk: re-weight every K optimizer steps (K > 0)")
    smoothing: float = Field(default=0.5, ge=0, le=1, description="ddk: Eq. 2 alpha; (1 - alpha) / N is the floor")
    eval_tokens: int = Field(default=4096, gt=0, description="ddk: held-out tokens scored per domain per update")
    gap: Literal["ppl", "logppl", "bpb", "kl"] = Field(
        default="ppl",
        description="ddk: student/teacher ppl ratio, its log (CE difference), bpb ratio, or KL(teacher || student)",
    )
    warmup: int = Field(
        default=0, ge=0, description="ddk: steps on a uniform mix before Eq. 1 (0: Eq. 1 before the first step)"
    )

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, v: dict[str, float]) -> dict[str, float]:
        bad = next((d for d, w in v.items() if not w >= 0 or w == float("inf")), None)
        if bad is not None:
            raise ValueError(f"weight of domain {bad!r} must be a finite number >= 0 (got {v[bad]})")
        if v and sum(v.values()) <= 0:
            raise ValueError("weights sum to zero; give at least one domain a positive weight")
        return v


class DataConfig(_Section):
    """Training / evaluation data: JSONL files (text or prompt/completion), packed to seq_len."""

    train: list[str] = Field(default_factory=list, description="JSONL files to train on")
    eval: list[str] = Field(default_factory=list, description="held-out JSONL files (eval.json after training)")
    seq_len: int = Field(default=256, ge=8, description="tokens per packed sequence")
    add_bos: bool = Field(default=True, description="put the tokenizer's <bos> at the start of every sequence")
    mixing: MixingConfig | None = Field(
        default=None, description="draw training sequences by domain weights (None: plain shuffling)"
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TrainConfig(_Section):
    """Optimisation and run-directory settings (passed to transformers.TrainingArguments)."""

    output_dir: str = "runs/distill"
    recipe: Literal["distill", "step_by_step"] = Field(
        default="distill",
        description="'distill' = KD on text / prompt-completion rows; 'step_by_step' = Distilling step-by-step on"
        " {input, label, rationale} rows (label task + loss.rationale_weight * rationale task)",
    )
    max_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1, description="sequences per device per micro-step")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no",
        description="autocast the student's forward/backward (weights and optimizer stay in model.dtype)",
    )
    seed: int = 0
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    overwrite: bool = Field(default=False, description="replace an existing output_dir instead of resuming")


class DistillConfig(_Section):
    """Everything `potstill distill` needs."""

    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class TeacherSourceConfig(_Section):
    """Who writes the data: a local HF model, or an OpenAI-compatible endpoint (`potstill generate`)."""

    backend: Literal["local", "endpoint"] = Field(default="local", description="'local' HF model or 'endpoint'")
    model: str = Field(description="local: HF directory (or .gguf); endpoint: the model name the server expects")
    base_url: str | None = Field(default=None, description="endpoint: base URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="endpoint: NAME of the env var holding the API key (null: no key)"
    )
    chat: bool = Field(default=False, description="send the prompt as a chat message (chat template / chat API)")
    system: str | None = Field(default=None, description="chat: optional system message")
    batch_size: int = Field(default=8, ge=1, description="local: prompts per generate() call")
    concurrency: int = Field(default=4, ge=1, description="endpoint: requests in flight at once")
    timeout: float = Field(default=60.0, gt=0, description="endpoint: seconds per request before it counts as failed")
    max_retries: int = Field(default=5, ge=0, description="endpoint: retries on 429/5xx/timeouts/bad responses")
    backoff: float = Field(default=0.5, ge=0, description="endpoint: first retry delay in s (doubles, with jitter)")
    cache: bool = Field(default=True, description="endpoint: on-disk request cache (rerun/resume never pays twice)")


class SamplingConfig(_Section):
    """Sampling parameters of the teacher (part of the request cache key)."""

    temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1, description="new tokens per sample")
    n: int = Field(default=1, ge=1, description="samples per input")
    seed: int = 0
    stop: list[str] = Field(default_factory=list, description="strings that end a sample (cut off, not kept)")


class GenerateConfig(_Section):
    """Everything `potstill generate` needs: inputs, mode, prompt template, teacher, sampling."""

    mode: Literal["complete", "explain", "rationale"] = "complete"
    inputs: list[str] = Field(default_factory=list, description="JSONL files of input rows (fields for the template)")
    output: str = Field(default="generated.jsonl", description="output JSONL (append-only, resumable)")
    template: str | None = Field(
        default=None, description="prompt template file ({field} placeholders); null: the built-in one of the mode"
    )
    teacher: TeacherSourceConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    label_field: str = Field(default="label", description="rationale: input field holding the gold label, if any")
    label_regex: str = Field(
        default=r"(?i)the answer is[:\s]*((?:(?!the answer is).)+?)\s*\.?\s*$",
        description="rationale: regex whose group 1 is the label (its last match in the output; the default's"
        " label cannot contain 'the answer is', so of two answers on one line the later one counts)",
    )
    overwrite: bool = Field(default=False, description="start the output over instead of resuming")

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("label_regex")
    @classmethod
    def _one_group(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v, re.MULTILINE).groups
        except re.error as err:
            raise ValueError(f"not a regular expression ({err})") from None
        if groups < 1:
            raise ValueError("needs a capturing group for the label")
        return v


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
