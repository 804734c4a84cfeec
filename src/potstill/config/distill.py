"""`DistillConfig`: everything `potstill distill` needs (model, loss, teacher, data, train sections).

The field descriptions are the reference (docs/config-reference.md and configs/kd_default.yaml are
generated from them). What a run needs across sections (a teacher unless alpha = 0, a cache dir with
teacher.source=cache, training data) is checked by `DistillConfig.check_runnable`, and by validation in
the context `{"run": True}` (`load_config(..., run=True)`); a plain load accepts a partial config, so
`--print-config` and tools that fill in paths later can still read it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from potstill.config.base import Dtype, LossName, Section, Seed, flag
from potstill.config.on_policy import OnPolicyConfig
from potstill.errors import UserError

LOSS_NAMES = get_args(LossName)


class TeacherEntry(Section):
    """One teacher of several (`model.teachers`; docs/teachers.md)."""

    path: str = Field(
        description="HF directory (or .gguf) of this teacher; its tokenizer may differ from the student's"
    )
    weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of this teacher's KD term where it applies; at each position the weights of the teachers"
        " that apply are normalized to sum to 1",
    )
    domains: list[str] | None = Field(
        default=None,
        description="the training domains this teacher distills (null: every domain); a domain named here must be"
        " in the training data",
    )


class ModelConfig(Section):
    """Where the student and teacher come from (HF directories)."""

    student: str = Field(
        description="HF directory of the student (AutoModelForCausalLM + tokenizer). A student made by"
        " `potstill student init` with a trimmed vocabulary carries potstill_vocab.json (student id -> teacher id);"
        " the teacher's logits are then computed over the student's ids only"
    )
    teacher: str | None = Field(
        default=None,
        description="HF directory (or .gguf) of the teacher; required unless loss.alpha=0 (then never loaded) or"
        " teacher.source=cache. Its tokenizer must match the student's (same tokens and ids, or the id map)",
    )
    teachers: list[TeacherEntry] = Field(
        default_factory=list,
        description="several teachers instead of model.teacher: [{path, weight, domains}]; the KD term is the sum of"
        " the per-teacher terms, weighted and routed per domain (online teachers, train.recipe=distill;"
        " docs/teachers.md)",
    )
    dtype: Dtype = Field(
        default="float32",
        description="dtype the student is loaded and trained in (and the teacher, unless teacher_dtype is set);"
        " bfloat16 also turns on the Trainer's bf16",
    )
    teacher_dtype: Dtype | None = Field(
        default=None,
        description="dtype of the frozen teacher (null: same as dtype); bfloat16 runs it several times faster on"
        " GPUs and on CPUs with AVX512-BF16/AMX, for ~0.005 nats of KL to its float32 outputs; on older CPUs bf16 is"
        " emulated and slower (docs/training.md, Cost notes)",
    )

    stop_token: str | None = Field(
        default=None,
        description="the student's <eos> becomes this token (one token of its vocabulary, e.g. an instruct teacher's"
        " '<|im_end|>'): completions end with it, rollouts stop at it, and the saved student's tokenizer and"
        " generation config carry it (null: the student's own <eos>; docs/on_policy.md, Chat data)",
    )
    chat_template: Literal["check", "student", "teacher"] = Field(
        default="check",
        description="chat records ({\"messages\": [...]}) are rendered with the student's chat template; 'check'"
        " refuses a teacher whose template differs, 'student' keeps the student's anyway, 'teacher' renders with the"
        " teacher's and saves it with the student (a base student without a template)",
    )

    @field_validator("teachers")
    @classmethod
    def _teachers_valid(cls, v: list[TeacherEntry]) -> list[TeacherEntry]:
        if v and sum(t.weight for t in v) <= 0:
            raise ValueError("the teachers' weights sum to zero; give at least one teacher a positive weight")
        empty = next((i for i, t in enumerate(v) if t.domains is not None and not t.domains), None)
        if empty is not None:
            raise ValueError(f"teachers[{empty}].domains is empty; list its domains, or null for every domain")
        return v

    @model_validator(mode="after")
    def _one_teacher_form(self) -> ModelConfig:
        if self.teacher is not None and self.teachers:
            raise ValueError("model.teacher and model.teachers are both set; give one teacher or the list")
        return self

    @property
    def teacher_paths(self) -> list[str]:
        """Every teacher's path: model.teacher, or those of model.teachers (empty: none)."""
        return [t.path for t in self.teachers] or ([self.teacher] if self.teacher else [])

    @property
    def teacher_load_dtype(self) -> str:
        """The dtype the teacher is loaded in: `teacher_dtype`, or `dtype` when that is null."""
        return self.teacher_dtype or self.dtype


class LossConfig(Section):
    """KD objective: alpha * T^2 * D(p_teacher || q_student) + (1 - alpha) * CE(labels)."""

    name: LossName = Field(
        default="fkl", description="the divergence D (`potstill losses` lists the formulas; docs/losses.md)"
    )
    alpha: float | Literal["auto"] = Field(
        default=0.5,
        description="weight of the KD term in [0, 1]; 0 = CE-only baseline (the teacher is never loaded or run);"
        " 'auto' = equal weighted gradient norms, measured on the first micro-batch (docs/training.md)",
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="softmax temperature T > 0 for both distributions; the T^2 factor keeps the KD gradient's scale",
    )
    beta: float = Field(
        default=0.5, ge=0, le=1, description="jsd: m = beta p + (1 - beta) q; 0 = fkl, 1 = rkl (TRL's convention)"
    )
    jsd_scaled: bool = Field(default=False, description="jsd: divide by beta (1 - beta), continuous in beta")
    skew: float = Field(default=0.1, ge=0, le=1, description="skl/srkl skew alpha in [0, 1] (DistiLLM uses 0.1)")
    akl_mu: float = Field(default=0.5, ge=0, le=1, description="akl: teacher mass mu in [0, 1] that defines the head")
    rationale_weight: float = Field(
        default=1.0,
        ge=0,
        description="train.recipe=step_by_step: lambda in L_label + lambda * L_rationale (0 = label-only fine-tuning)",
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
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="fused loss: tokens per chunk (null = about 2^24 logits per chunk: 64 tokens at V = 262k)",
    )
    cross_tokenizer: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="a teacher with another tokenizer: 'auto' = cross-tokenizer KD when the tokenizers differ (the"
        " teacher reads the same text through its own tokenizer; docs/cross_tokenizer.md), 'always' = even when they"
        " are the same, 'never' = refuse a teacher whose tokenizer differs",
    )
    cross_seq_weight: float = Field(
        default=1.0,
        ge=0,
        description="cross-tokenizer KD: weight of the group-likelihood term beside the shared-vocabulary"
        " distribution term (kd = distribution + cross_seq_weight * group likelihood)",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1] or 'auto' (got {v})")
        return v


class HiddenFiltersConfig(Section):
    """TED's task-aware filters (Liang et al. 2023; docs/hidden.md "Task-aware filters")."""

    steps: int = Field(
        default=0,
        ge=0,
        description="stage-1 steps: one linear filter per mapped teacher layer is trained on next-token CE through"
        " the frozen teacher's head, then the term matches student filters to them (0 = off: raw states)",
    )
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate of the stage-1 filters")


class HiddenConfig(Section):
    """Intermediate-layer (hidden-state) distillation, a third term beside KD and CE (TED-like; docs/hidden.md)."""

    weight: float = Field(
        default=0.0,
        ge=0,
        description="weight w of the hidden-state term: loss = KD + CE + w * H, H = the mean over mapped layers of the"
        " per-position distance between normalized hidden states (0 = off)",
    )
    layers: dict[int, int] | Literal["auto"] = Field(
        default="auto",
        description="student layer -> teacher layer (0-based; the output of that decoder layer). 'auto': a student"
        " pruned by `potstill student init` maps each layer to the teacher layer it was copied from; any other"
        " student maps layer i of S to layer round((i + 1) T / S) - 1 of the teacher's T",
    )
    distance: Literal["mse", "cosine"] = Field(
        default="mse",
        description="'mse' = mean squared difference of the layer-normalized (zero mean, unit variance) states;"
        " 'cosine' = 1 - cosine similarity",
    )
    projection: bool = Field(
        default=False,
        description="learn a linear map student width -> teacher width per mapped layer (needed when the widths"
        " differ; trained with the student, kept in checkpoints, dropped from the final student)",
    )
    filters: HiddenFiltersConfig = Field(
        default_factory=HiddenFiltersConfig, description="TED's task-aware filters (filters.steps > 0 turns them on)"
    )


class TeacherEndpointConfig(Section):
    """A teacher that is only a server: it scores token ids through `/v1/completions` (echo, logprobs, max_tokens 0)."""

    base_url: str = Field(description="the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (vLLM, potstill serve)")
    model: str = Field(description="the model name the server expects")
    api_key_env: str | None = Field(
        default=None, description="NAME of the env var holding the API key (null: a server without authentication)"
    )
    top_k: int = Field(
        default=20,
        ge=1,
        description="teacher tokens per position (the request's logprobs; vLLM allows up to its --max-logprobs, 20)",
    )
    batch_size: int = Field(default=8, ge=1, description="sequences per scoring request")
    concurrency: int = Field(default=4, ge=1, description="scoring requests in flight at once")
    timeout: float = Field(default=60.0, gt=0, description="seconds per request attempt before it counts as failed")
    max_retries: int = Field(default=5, ge=0, description="retries on 429/5xx/timeouts/dropped connections/bad answers")
    backoff: float = Field(default=0.5, ge=0, description="first retry delay bound in s (doubles, full jitter)")
    tolerance: float = Field(
        default=1e-3,
        ge=0,
        description="self-test at start: largest difference in nats allowed between two scorings of the same tokens",
    )


class TeacherConfig(Section):
    """Where the teacher's distributions come from during training."""

    source: Literal["online", "cache", "endpoint"] = Field(
        default="online",
        description="'online' = run model.teacher on every batch; 'cache' = read top-k targets from teacher.cache"
        " (no teacher model in memory); 'endpoint' = score through teacher.endpoint (train.recipe=on_policy;"
        " model.teacher, when set, is read for its tokenizer only, to check the special tokens)",
    )
    endpoint: TeacherEndpointConfig | None = Field(
        default=None, description="teacher.source=endpoint: the server that scores the student's sequences"
    )
    cache: str | None = Field(
        default=None,
        description="teacher cache dir written by `potstill cache build` (build it with `potstill cache build -c"
        " THIS_CONFIG`), required with source=cache",
    )


class MixingConfig(Section):
    """How training sequences are drawn by domain (`potstill.data.mixing`); DDK re-weights during training."""

    mode: Literal["uniform", "proportional", "fixed", "ddk"] = Field(
        default="ddk", description="uniform, proportional (to data size), fixed (`weights`), or ddk (adaptive)"
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="mode fixed: domain -> weight (>= 0), every training domain, sum > 0"
    )
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
        bad = next((d for d, w in v.items() if w < 0), None)  # non-finite ones are refused by Section
        if bad is not None:
            raise ValueError(f"weight of domain {bad!r} must be a finite number >= 0 (got {v[bad]})")
        if v and sum(v.values()) <= 0:
            raise ValueError("weights sum to zero; give at least one domain a positive weight")
        return v


class DataConfig(Section):
    """Training / evaluation data: JSONL files (text or prompt/completion), packed to seq_len."""

    train: list[str] = Field(
        default_factory=list,
        description='JSONL files to train on: {"text": ...} or {"prompt": ..., "completion": ...} (loss on the'
        ' completion only), optional "domain"; at least one is required to run',
    )
    eval: list[str] = Field(
        default_factory=list,
        description="held-out JSONL files; when set, OUT/eval.json (ppl, bits/byte, top-1 agreement, KL to teacher,"
        " per domain) is written after training",
    )
    seq_len: int = Field(default=256, ge=8, description="tokens per packed sequence")
    add_bos: bool = Field(
        default=True, description="put the tokenizer's <bos> at the start of every sequence (Gemma needs it)"
    )
    mixing: MixingConfig | None = Field(
        default=None, description="draw training sequences by domain weights (null: plain shuffling; docs/ddk.md)"
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TrainConfig(Section):
    """Optimisation and run-directory settings (passed to transformers.TrainingArguments)."""

    output_dir: str = Field(
        default="runs/distill", description="the run directory; rerunning the same command resumes it"
    )
    recipe: Literal["distill", "step_by_step", "on_policy"] = Field(
        default="distill",
        description="'distill' = KD on text / prompt-completion rows; 'step_by_step' = Distilling step-by-step on"
        " {input, label, rationale} rows (label task + loss.rationale_weight * rationale task; with data.eval of"
        " {input, label} rows, eval.json and summary.json hold the label accuracy; docs/generate.md);"
        " 'on_policy' = the student learns on its own samples of prompt/completion rows, graded by the teacher"
        " (section on_policy; docs/on_policy.md)",
    )
    max_steps: int = Field(default=100, ge=1, description="optimizer steps")
    batch_size: int = Field(default=8, ge=1, description="sequences per device per micro-step")
    grad_accum: int = Field(
        default=1, ge=1, description="micro-steps per optimizer step (global batch = batch_size * grad_accum * ranks)"
    )
    lr: float = Field(default=3e-4, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(default=10, ge=0, description="linear warmup steps")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="learning-rate schedule after the warmup"
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, ge=0, description="gradient clipping (0 = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no",
        description="autocast the student's forward/backward (weights and optimizer stay in model.dtype)",
    )
    seed: Seed = Field(default=0, description="model init randomness, dropout and the data order")
    logging_steps: int = Field(
        default=10, ge=1, description="one OUT/log.jsonl line (loss, kd, ce, alpha, grad_ratio, lr) every N steps"
    )
    save_steps: int = Field(
        default=0,
        ge=0,
        description="write a resumable checkpoint (OUT/checkpoint-N: model, optimizer, scheduler, RNG) every N"
        " optimizer steps and after the last one, keeping the newest 2; 0 = no periodic checkpoints, so a killed run"
        " starts over (a SIGTERM / SIGINT still saves one and stops). OUT/student is saved at the end either way",
    )
    overwrite: bool = Field(
        default=False,
        description="replace an existing output_dir instead of resuming it",
        json_schema_extra=flag("--overwrite"),
    )


class DistillConfig(Section):
    """Everything `potstill distill` needs."""

    model: ModelConfig = Field(description="the student and the teacher")
    loss: LossConfig = Field(default_factory=LossConfig, description="the KD objective")
    hidden: HiddenConfig = Field(
        default_factory=HiddenConfig, description="intermediate-layer distillation (a hidden-state term; 0 = off)"
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="online teacher or a teacher cache")
    data: DataConfig = Field(default_factory=DataConfig, description="training and held-out data")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation and the run directory")
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="rollouts and objective of train.recipe=on_policy"
    )

    @property
    def teacher_kind(self) -> Literal["online", "cache", "endpoint"] | None:
        """Where the run's teacher distributions come from: "online", "cache", "endpoint", or None (CE only,
        loss.alpha = 0)."""
        return None if self.loss.alpha == 0 else self.teacher.source

    def run_problem(self) -> str | None:
        """What keeps this config from starting a run (`key: why`), or None."""
        if self.teacher_kind == "online" and not self.model.teacher_paths:
            return "model.teacher: required unless loss.alpha=0 (CE only) or teacher.source=cache"
        if self.model.teachers and (problem := self._teachers_problem()):
            return problem
        if self.teacher_kind == "cache" and self.teacher.cache is None:
            return "teacher.cache: required with teacher.source=cache (a `potstill cache build` dir)"
        if not self.data.train:
            return "data.train: at least one JSONL file is required"
        if self.hidden.weight > 0 and self.teacher_kind != "online":
            return "hidden.weight: the hidden-state term needs an online teacher (teacher.source=online, alpha > 0)"
        if self.hidden.weight > 0 and self.train.recipe != "distill":
            return f"hidden.weight: the hidden-state term is built for train.recipe=distill, not {self.train.recipe}"
        if self.train.recipe == "on_policy" and self.teacher.source == "cache":
            return "teacher.source: a teacher cache cannot score the student's new samples; use an online teacher"
        if self.train.recipe == "on_policy" and self.teacher_kind is None:
            return "loss.alpha: train.recipe=on_policy needs a teacher (alpha > 0)"
        if self.train.recipe == "on_policy" and (problem := self._on_policy_problem()):
            return problem
        if self.teacher_kind == "endpoint":
            return self._endpoint_problem()
        return None

    def _teachers_problem(self) -> str | None:
        """What keeps several teachers (`model.teachers`) from working in this run, or None."""
        if self.teacher.source != "online":
            return (
                f"model.teachers: several teachers run online; teacher.source={self.teacher.source} takes one teacher"
            )
        if self.train.recipe != "distill":
            return f"model.teachers: several teachers are built for train.recipe=distill, not {self.train.recipe}"
        if self.hidden.weight > 0:
            return "model.teachers: the hidden-state term compares one teacher's layers; set hidden.weight=0"
        return None

    def _on_policy_problem(self) -> str | None:
        """What keeps the on_policy section of a run from working, or None."""
        op = self.on_policy
        if any(not stop for stop in op.stop):
            return "on_policy.stop: a stop string must not be empty"
        if op.adaptive and not self.data.eval:
            return "on_policy.adaptive: the student-generated fraction adapts to a validation loss; set data.eval"
        if op.replay_size > 0 and op.objective in ("rkl_sampled", "minillm"):
            return (
                f"on_policy.replay_size: replayed samples come from an older student, which biases the policy"
                f" gradient of objective {op.objective}; use gkd or rkl_topk, or replay_size=0"
            )
        if op.min_eos_ratio > 0 and (op.health_prompts == 0 or self.teacher_kind != "online"):
            return "on_policy.min_eos_ratio: needs health_prompts > 0 and a teacher in memory (its own <eos> rate)"
        if op.teacher_mix > 0 and op.objective != "minillm":
            return "on_policy.teacher_mix: teacher-mixed sampling belongs to objective=minillm"
        if op.teacher_mix > 0 and (op.top_p < 1 or op.temperature != self.loss.temperature):
            return (
                "on_policy.teacher_mix: teacher-mixed sampling draws from the whole mixture at loss.temperature (the"
                " importance weights are computed there): set on_policy.top_p=1 and on_policy.temperature equal to"
                " loss.temperature"
            )
        return None

    def _endpoint_problem(self) -> str | None:
        """What keeps a `teacher.source: endpoint` run from starting, or None."""
        if self.teacher.endpoint is None:
            return "teacher.endpoint: required with teacher.source=endpoint (base_url and model of the server)"
        if self.train.recipe != "on_policy":
            return "teacher.source: an endpoint teacher scores only train.recipe=on_policy runs"
        if self.loss.temperature != 1.0:
            return "loss.temperature: an endpoint returns log-probs at temperature 1; set loss.temperature=1"
        if self.on_policy.seq_kd:
            return "on_policy.seq_kd: an endpoint teacher scores but does not sample here; set on_policy.seq_kd=false"
        op = self.on_policy
        if op.objective == "minillm" and (op.teacher_mix > 0 or op.single_step):
            return (
                "on_policy.objective: minillm with an endpoint teacher needs on_policy.teacher_mix=0 (the endpoint"
                " cannot sample token by token) and on_policy.single_step=false (it gives no full distribution)"
            )
        if op.objective == "rkl_topk" and op.top_k > self.teacher.endpoint.top_k:
            return (
                f"on_policy.top_k: {op.top_k} teacher tokens per position, but teacher.endpoint.top_k asks the"
                f" endpoint for {self.teacher.endpoint.top_k}"
            )
        return None

    def check_runnable(self) -> DistillConfig:
        """Raise the one-line UserError of `run_problem` (what a run checks before loading anything); returns self."""
        problem = self.run_problem()
        if problem is not None:
            raise UserError(f"config: {problem}")
        return self

    @model_validator(mode="after")
    def _runnable(self, info: ValidationInfo) -> DistillConfig:
        if info.context and info.context.get("run"):
            problem = self.run_problem()
            if problem is not None:
                raise ValueError(problem)
        return self
