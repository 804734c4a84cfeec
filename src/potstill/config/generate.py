"""`GenerateConfig`: everything `potstill generate` needs (inputs, mode, template, teacher, sampling)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from potstill.config.base import Dtype, Section, Seed, flag


class TeacherSourceConfig(Section):
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
    dtype: Dtype = Field(default="float32", description="local: the model's dtype (bfloat16: faster where native)")
    concurrency: int = Field(default=4, ge=1, description="endpoint: requests in flight at once")
    timeout: float = Field(default=60.0, gt=0, description="endpoint: seconds per request before it counts as failed")
    max_retries: int = Field(default=5, ge=0, description="endpoint: retries on 429/5xx/timeouts/bad responses")
    backoff: float = Field(default=0.5, ge=0, description="endpoint: first retry delay in s (doubles, with jitter)")
    cache: bool = Field(default=True, description="endpoint: on-disk request cache (rerun/resume never pays twice)")


class SamplingConfig(Section):
    """Sampling parameters of the teacher (part of the request cache key)."""

    temperature: float = Field(default=0.0, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens with this mass"
    )
    max_tokens: int = Field(default=256, ge=1, description="new tokens per sample")
    n: int = Field(default=1, ge=1, description="samples per input")
    seed: Seed = Field(default=0, description="sampling seed (local: torch; endpoint: sent as `seed`)")
    stop: list[str] = Field(default_factory=list, description="strings that end a sample (cut off, not kept)")
    no_repeat_ngram_size: int = Field(
        default=0,
        ge=0,
        description="n > 0: a sample never repeats an n-gram of its own new tokens (n-grams of the prompt may be"
        " copied); stops the loops of small models at greedy; local backend only; 0 = off",
    )


class GenerateConfig(Section):
    """Everything `potstill generate` needs: inputs, mode, prompt template, teacher, sampling."""

    mode: Literal["complete", "explain", "rationale"] = Field(
        default="complete",
        description="complete = completions of prompts (sequence-level KD); explain = explanations of labelled"
        " inputs; rationale = rationales ending in a label (Distilling step-by-step); docs/generate.md",
    )
    inputs: list[str] = Field(default_factory=list, description="JSONL files of input rows (fields for the template)")
    output: str = Field(default="generated.jsonl", description="output JSONL (append-only, resumable)")
    template: str | None = Field(
        default=None, description="prompt template file ({field} placeholders); null: the built-in one of the mode"
    )
    teacher: TeacherSourceConfig = Field(description="who writes the data")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="sampling parameters")
    label_field: str = Field(default="label", description="rationale: input field holding the gold label, if any")
    label_regex: str = Field(
        default=r"(?i)the answer is[:\s]*((?:(?!the answer is).)+?)\s*\.?\s*$",
        description="rationale: regex whose group 1 is the label (its last match in the output; the default's"
        " label cannot contain 'the answer is', so of two answers on one line the later one counts)",
    )
    overwrite: bool = Field(
        default=False, description="start the output over instead of resuming", json_schema_extra=flag("--overwrite")
    )

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
