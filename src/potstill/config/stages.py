"""Typed configs of the stages around training: `cache build`, `student init`, `eval`.

Each is flat (one key per CLI option, plus a few without one) and its field names are the keyword
arguments of the API function the command calls (`build_cache`, `init_student_cli`, `evaluate_cli`).
A teacher cache must match the run that reads it, so `cache_settings_from_distill` derives every setting
the run decides (teacher, data, packing, temperature, teacher dtype, student tokenizer, cache dir) from a
`DistillConfig` and refuses a different value for any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from potstill.config.base import CacheEncoding, CacheTargets, Dtype, LayerSelection, Section, Seed, flag
from potstill.config.distill import DistillConfig
from potstill.errors import UserError


def _files(v: Any) -> Any:
    return [v] if isinstance(v, (str, Path)) else v


def _some_files(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("at least one JSONL file is required")
    return v


class CacheConfig(Section):
    """Everything `potstill cache build` needs: the teacher's sparse targets over packed data (docs/cache.md)."""

    teacher: str = Field(description="teacher HF directory (or .gguf)", json_schema_extra=flag("--teacher"))
    data: list[str] = Field(
        description="JSONL file(s), packed like the training data (the run's data.train)",
        json_schema_extra=flag("--data"),
    )
    out: str = Field(
        description="cache directory (the run's teacher.cache); a rerun resumes an interrupted build",
        json_schema_extra=flag("--out"),
    )
    k: int = Field(
        default=64, ge=1, description="top-k ids kept per position (targets=topk)", json_schema_extra=flag("--k")
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="softmax temperature of the stored targets; the run's loss.temperature must equal it",
        json_schema_extra=flag("--temperature"),
    )
    seq_len: int = Field(
        default=256,
        ge=2,
        description="tokens per packed sequence (the run's data.seq_len)",
        json_schema_extra=flag("--seq-len"),
    )
    add_bos: bool = Field(
        default=True,
        description="start every sequence with <bos> (the run's data.add_bos)",
        json_schema_extra=flag("--add-bos"),
    )
    targets: CacheTargets = Field(
        default="topk",
        description="'topk' = the k most probable ids + tail mass; 'sampled' = `samples` draws per position, ids +"
        " counts (Sparse Logit Sampling); 'hidden' = the teacher's final hidden state per position (bf16, 2 x H"
        " bytes): with the teacher's head at train time, the exact full distribution at any temperature",
        json_schema_extra=flag("--targets"),
    )
    samples: int = Field(
        default=32, ge=1, le=255, description="draws per position for targets=sampled (counts are uint8)",
        json_schema_extra=flag("--samples"),
    )  # fmt: skip
    encoding: CacheEncoding = Field(
        default="compact",
        description="'compact' = quantized log-probs (~100-150 bytes/token at k=64); 'lossless' = int32 ids +"
        " float32 log-probs",
        json_schema_extra=flag("--encoding"),
    )
    student: str | None = Field(
        default=None,
        description="student HF directory (the run's model.student): its tokenizer packs the data and, with a trimmed"
        " vocabulary (potstill_vocab.json), ids are student ids",
        json_schema_extra=flag("--student"),
    )
    batch_size: int = Field(
        default=8, ge=1, description="sequences per teacher forward (bounds memory: batch x seq_len x V logits)",
        json_schema_extra=flag("--batch-size"),
    )  # fmt: skip
    shard_tokens: int = Field(
        default=1 << 18, ge=1, description="about this many positions per shard (whole sequences)",
        json_schema_extra=flag("--shard-tokens"),
    )  # fmt: skip
    seed: Seed = Field(default=0, description="seed of the sampled targets (each shard has its own seeded generator)")
    dtype: Dtype = Field(
        default="float32",
        description="dtype of the teacher's weights (the run's model.teacher_dtype, else model.dtype); the log-probs"
        " are computed in float32 either way",
        json_schema_extra=flag("--dtype"),
    )
    overwrite: bool = Field(
        default=False, description="replace a cache built with other settings", json_schema_extra=flag("--overwrite")
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _files(v)

    @field_validator("data")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        return _some_files(v)


class StudentInitConfig(Section):
    """Everything `potstill student init` needs: prune a teacher into a student (docs/student.md)."""

    teacher: str = Field(description="teacher HF directory (or .gguf)", json_schema_extra=flag("--teacher"))
    layers: int = Field(ge=1, description="decoder layers the student keeps", json_schema_extra=flag("--layers"))
    out: str = Field(description="output HF directory of the student", json_schema_extra=flag("--out"))
    corpus: list[str] = Field(
        default_factory=list,
        description="JSONL text: calibration data (layer importance) and the vocabulary to keep; needed unless"
        " trim_vocab=false and selection=even",
        json_schema_extra=flag("--corpus"),
    )
    trim_vocab: bool = Field(
        default=True,
        description="keep only the tokens the corpus uses (+ bytes, specials, BPE intermediates)",
        json_schema_extra=flag("--trim-vocab"),
    )
    selection: LayerSelection = Field(
        default="measured",
        description="which layers: 'measured' = calibration loss when a layer is skipped; 'even' = evenly spaced,"
        " first and last kept (needs no corpus)",
        json_schema_extra=flag("--select"),
    )
    vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="fill the trimmed vocabulary up to this many ids with the teacher's highest-priority merges"
        " (null: only what the corpus needs)",
        json_schema_extra=flag("--vocab-size"),
    )
    calib_tokens: int = Field(
        default=4096, ge=1, description="corpus tokens the layer scores are measured on (fewer: faster, noisier)"
    )
    calib_dtype: Dtype = Field(
        default="float32",
        description="dtype of the teacher copy that scores layers (bfloat16: ~2x faster on CPUs with AVX512-BF16);"
        " the student is built from the teacher's weights as loaded",
        json_schema_extra=flag("--calib-dtype"),
    )
    overwrite: bool = Field(
        default=False, description="replace an existing output directory", json_schema_extra=flag("--overwrite")
    )

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _files(v)


class EvalConfig(Section):
    """Everything `potstill eval` needs: ppl, bits per byte (and teacher agreement / KL) per domain (docs/eval.md)."""

    model: str = Field(description="HF directory of the model to evaluate", json_schema_extra=flag("--model"))
    data: list[str] = Field(
        description="JSONL file(s) with text (and optional domain)", json_schema_extra=flag("--data")
    )
    out: str = Field(description="output directory; eval.json is written there", json_schema_extra=flag("--out"))
    teacher: str | None = Field(
        default=None,
        description="teacher HF directory: adds top-1 agreement and KL to the teacher (same tokenizer, or the one a"
        " trimmed student was made from)",
        json_schema_extra=flag("--teacher"),
    )
    seq_len: int = Field(
        default=256, ge=8, description="tokens per packed sequence", json_schema_extra=flag("--seq-len")
    )
    batch_size: int = Field(
        default=8, ge=1, description="sequences per forward pass", json_schema_extra=flag("--batch-size")
    )
    overwrite: bool = Field(
        default=False, description="replace an existing eval.json", json_schema_extra=flag("--overwrite")
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _files(v)

    @field_validator("data")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        return _some_files(v)


# ----- cache build from a training config ------------------------------------------------------------------------

DERIVED = {
    "teacher": "model.teacher",
    "data": "data.train",
    "student": "model.student",
    "seq_len": "data.seq_len",
    "add_bos": "data.add_bos",
    "temperature": "loss.temperature",
    "dtype": "model.teacher_dtype",
    "out": "teacher.cache",
}
"""CacheConfig fields a training config decides -> the DistillConfig key they come from."""


def _same(key: str, a: Any, b: Any) -> bool:
    if key in ("teacher", "student", "out"):
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    if key == "data":
        return [Path(p).resolve() for p in _files(a)] == [Path(p).resolve() for p in b]
    return a == b


def cache_settings_from_distill(run: DistillConfig, own: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The raw CacheConfig of the cache `run` reads: its derived settings + the cache-only ones in `own`.

    Args:
        run: the training config.
        own: CacheConfig keys given besides it (overrides and CLI options); a derived key must agree with `run`.
        names: how to name each key of `own` in an error (its CLI option, or the key itself).

    Raises:
        UserError: the run has no teacher or no training data, or `own` sets a derived setting differently.
    """
    derived = {
        "teacher": run.model.teacher,
        "data": list(run.data.train),
        "student": run.model.student,
        "seq_len": run.data.seq_len,
        "add_bos": run.data.add_bos,
        "temperature": run.loss.temperature,
        "dtype": run.model.teacher_load_dtype,
        "out": run.teacher.cache,
    }
    if derived["teacher"] is None:
        raise UserError("config: model.teacher: required to build a teacher cache")
    if not derived["data"]:
        raise UserError("config: data.train: at least one JSONL file is required")
    for key, value in own.items():
        if key not in DERIVED or (key == "out" and derived["out"] is None):
            continue
        if not _same(key, value, derived[key]):
            source = DERIVED[key] if key != "dtype" else "model.teacher_dtype (or model.dtype)"
            raise UserError(
                f"{names.get(key, key)} {value!r}: the training config sets {source}={derived[key]!r}, and a cache"
                f" must match the run that reads it; change {source} in the training config instead"
            )
    if derived["out"] is None:
        derived.pop("out")
    return {**own, **derived}
