"""The memory, disk and time estimate of `potstill plan` (see the package docstring for the models)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from potstill.config import DistillConfig
from potstill.errors import UserError
from potstill.models.vocab import id_map_size
from potstill.plan.probe import PROBE_PARTS, probe_step, step_seconds

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Peak RSS of a process that has imported torch, transformers and potstill's trainer (measured: 475-490 MiB),
# plus the Trainer's own state (accelerate, dataloader) measured on a tiny 2-step run_distill.
RUNTIME_BYTES = 520 * MIB
# Values saved for backward per token and layer, in units of the hidden size H (norm inputs/outputs, q, k, v,
# attention output, o_proj input, two residuals...) and of the MLP width I (gate, up, activation, product).
ACT_HIDDEN = 10
ACT_MLP = 4
# [tokens, V] float32 tensors alive at the dense loss's peak: logits, teacher logits, log-probs, the
# divergence's intermediates and the logits' gradient (benchmarks/README.md, "Fused loss": 8 at fkl).
DENSE_COPIES = 8
CE_COPIES = 3  # CE only (loss.alpha = 0): logits, log-probs, grad; dense or per fused chunk
# [chunk, V] buffers alive inside the fused loss (losses/fused.py: logits, teacher logits, log-probs, CE, grad).
FUSED_COPIES = 8
CHUNK_ELEMENTS = 2**24  # = losses.fused.CHUNK_ELEMENTS (not imported: that would import torch for --help paths)
# Teacher cache bytes/token, compact and lossless encodings, V = 262,144 (benchmarks/README.md "Teacher cache");
# smaller vocabularies need fewer bytes per id, so these are upper bounds there.
CACHE_BYTES = {
    "compact": {8: 28.0, 32: 82.3, 64: 149.9, 128: 279.7},
    "lossless": {8: 48.0, 32: 184.2, 64: 357.6, 128: 726.6},
}
# The step-time probe: after one warm-up micro-step, timed micro-steps alternate between 1 and 2 layers until
# PROBE_SECONDS have passed, with at least PROBE_REPEATS[0] and at most PROBE_REPEATS[1] per depth.
BYTES_PER_TOKEN_TEXT = 4.0  # UTF-8 bytes of JSONL per token, for the data estimate (code/English, BPE ~32k-262k)
HEADROOM = 0.9  # plan to use at most this share of the memory budget
DEFAULT_K = 64


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model's `config.json`."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one decoder layer (attention q, k, v, o + gated MLP); norms are negligible."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """All parameters: embedding, layers, norms, and the head unless it is tied to the embedding."""
        head = 0 if self.tied else self.vocab * self.hidden
        norms = self.layers * 4 * self.hidden + self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params + norms + head


def read_shape(model_dir: str | Path, role: str) -> ModelShape:
    """Read a model directory's `config.json` (no weights).

    Raises:
        UserError: the directory or its config.json is missing, unreadable or lacks a needed field.
    """
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: model.{role}: not a directory (expected an HF model dir with config.json)")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: model.{role}: no config.json (not an HF model directory)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: model.{role}: unreadable config.json ({err})") from None
    cfg = {**cfg, **cfg.get("text_config", {})}  # multimodal configs nest the language model
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            vocab=int(cfg["vocab_size"]),
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            tied=bool(cfg.get("tie_word_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: model.{role}: config.json lacks a usable {err} field") from None


def data_tokens(paths: list[str]) -> tuple[int, int]:
    """(JSONL bytes, estimated tokens) of the training files, from their sizes.

    Raises:
        UserError: a file is missing.
    """
    total = 0
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: data.train: file not found")
        total += Path(p).stat().st_size
    return total, math.ceil(total / BYTES_PER_TOKEN_TEXT)


def cache_bytes_per_token(k: int, encoding: str = "compact") -> float:
    """Measured bytes/token at k (piecewise linear between the measured k, extrapolated past the ends)."""
    table = sorted(CACHE_BYTES[encoding].items())
    (k0, b0), (k1, b1) = next(((a, b) for a, b in zip(table, table[1:], strict=False) if k <= b[0]), table[-2:])
    return max(b0 + (b1 - b0) * (k - k0) / (k1 - k0), 1.0)


def memory_budget() -> int:
    """This machine's physical memory in bytes (os.sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _student_memory(s: ModelShape, cfg: DistillConfig, chunk: int) -> dict[str, int]:
    """Bytes of the student's parts: weights + grads + AdamW, activations, loss (dense or fused)."""
    elem = DTYPE_BYTES[cfg.model.dtype]
    b, t = cfg.train.batch_size, cfg.data.seq_len
    tokens = b * t
    acts = s.layers * tokens * (ACT_HIDDEN * s.hidden + ACT_MLP * s.intermediate) * elem
    scores = b * s.heads * t * t * 4
    kd = cfg.teacher_kind is not None
    if cfg.loss.fused:
        loss = s.vocab * s.hidden * 4 + (FUSED_COPIES if kd else CE_COPIES) * min(chunk, tokens) * s.vocab * 4
    else:
        loss = (DENSE_COPIES if kd else CE_COPIES) * tokens * s.vocab * 4
    return {"student_weights": s.params * elem, "student_grads_adamw": 3 * s.params * elem,
            "activations": acts + scores, "loss": loss}  # fmt: skip


def _teacher_shapes(cfg: DistillConfig) -> list[ModelShape]:
    """The shapes of the run's online teachers: `model.teacher`, or every entry of `model.teachers` (none for CE
    only; a cached run keeps `model.teacher`'s, for the online-vs-cache comparison).

    Raises:
        UserError: a teacher's directory or config.json is missing or unusable (named by its field).
    """
    if cfg.teacher_kind is None:
        return []
    if cfg.model.teachers:
        return [read_shape(t.path, f"teachers[{k}].path") for k, t in enumerate(cfg.model.teachers)]
    return [read_shape(cfg.model.teacher, "teacher")] if cfg.model.teacher else []


def _teacher_memory(ts: list[ModelShape], s: ModelShape, cfg: DistillConfig, has_map: bool) -> dict[str, int]:
    """Bytes of the online teachers: each one's weights and head copy for an id map, and one layer's no-grad
    activations of the widest (the teachers run one after another, so one layer's activations are alive at once).

    Returns:
        one teacher: {"teacher_online": all of it}; several: {"teacher_online/t{k}": teacher k's weights and head
        copy, ..., "teacher_activations": the largest activations}.
    """
    elem = DTYPE_BYTES[cfg.model.teacher_load_dtype]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    resident = [t.params * elem + (s.vocab * t.hidden * elem if has_map else 0) for t in ts]
    scores = [cfg.train.batch_size * t.heads * cfg.data.seq_len**2 * 4 for t in ts]
    acts = max(tokens * (3 * t.hidden + 2 * t.intermediate) * elem + sc for t, sc in zip(ts, scores, strict=True))
    if len(ts) == 1:
        return {"teacher_online": resident[0] + acts}
    return {**{f"teacher_online/t{k}": size for k, size in enumerate(resident)}, "teacher_activations": acts}


@dataclass
class Plan:
    """The estimate; every size in bytes, times in seconds. `to_json()` is what `potstill plan --json` prints."""

    student_params: int
    teacher_params: int | None
    teachers: int
    student_vocab: int
    tokens_per_step: int
    memory: dict[str, int]
    online_total: int | None
    cache_total: int
    budget: int
    data_bytes: int
    data_tokens: int
    cache_disk: dict[str, float]
    disk_free: int
    probe: dict[str, object] | None
    step_seconds: dict[str, float]
    run_seconds: dict[str, float]
    recommend: dict[str, object]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def plan_config(cfg: DistillConfig, memory_bytes: int | None = None, students: int = 1, probe: bool = True) -> Plan:
    """Estimate memory, disk and time of `run_distill(cfg)` and recommend online vs cache, k and chunk size.

    Args:
        cfg: the distill config (as `potstill distill` would run it).
        memory_bytes: memory budget (default: this machine's RAM).
        students: how many students will distill from this teacher on this data (> 1 favours a cache).
        probe: time a few shrunk training steps for the step time (a few seconds; False: no torch import, no
            times). Skipped when the run's cached total exceeds this machine's memory.

    Raises:
        UserError: a missing model dir, config.json or data file.
    """
    s = read_shape(cfg.model.student, "student")
    ts = _teacher_shapes(cfg)
    has_map = id_map_size(cfg.model.student) is not None
    budget = memory_bytes or memory_budget()
    micro_tokens = cfg.train.batch_size * cfg.data.seq_len
    chunk = min(cfg.loss.chunk_size or max(8, CHUNK_ELEMENTS // s.vocab), micro_tokens)
    memory = {"runtime": RUNTIME_BYTES, **_student_memory(s, cfg, chunk)}
    cache_total = sum(memory.values())
    teacher_memory = _teacher_memory(ts, s, cfg, has_map) if ts else {}
    memory |= teacher_memory
    online_total = cache_total + sum(teacher_memory.values()) if ts else None
    data_bytes, n_tokens = data_tokens(cfg.data.train)
    cache_disk = {f"{enc} k={k}": cache_bytes_per_token(k, enc) * n_tokens for enc in CACHE_BYTES for k in (8, 32, 64)}
    out_dir = Path(cfg.train.output_dir).resolve()
    disk_free = shutil.disk_usage(next(p for p in (out_dir, *out_dir.parents) if p.exists())).free
    paths = cfg.model.teacher_paths if ts else []
    timing = probe_step(cfg, s.vocab, teachers=paths) if probe and cache_total <= memory_budget() else None
    step = {} if timing is None else step_seconds(timing, s, ts, cfg)
    logged = math.ceil(cfg.train.max_steps / cfg.train.logging_steps)  # the last step always logs
    run = {k: cfg.train.max_steps * v + logged * step["logging_extra"] for k, v in step.items() if k != "logging_extra"}
    plan = Plan(
        student_params=s.params,
        teacher_params=sum(t.params for t in ts) if ts else None,
        teachers=len(ts),
        student_vocab=s.vocab,
        tokens_per_step=cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
        memory=memory,
        online_total=online_total,
        cache_total=cache_total,
        budget=budget,
        data_bytes=data_bytes,
        data_tokens=n_tokens,
        cache_disk=cache_disk,
        disk_free=disk_free,
        probe=None if timing is None else asdict(timing),
        step_seconds=step,
        run_seconds=run,
        recommend={},
    )
    plan.recommend = recommend(plan, s, cfg, students, chunk)
    return plan


def recommend(plan: Plan, s: ModelShape, cfg: DistillConfig, students: int, chunk: int) -> dict[str, object]:
    """Online vs cache, k and chunk size, each with the reason."""
    room = HEADROOM * plan.budget
    rec: dict[str, object] = {}
    if plan.online_total is None:
        rec["teacher"] = "none (loss.alpha = 0: CE only)"
    elif plan.online_total <= room and students <= 1:
        rec["teacher"] = "online: teacher fits beside the student"
    elif plan.online_total > room:
        rec["teacher"] = "cache: online teacher does not fit beside the student (potstill cache build)"
    else:
        rec["teacher"] = f"cache: {students} students reuse one teacher pass (potstill cache build)"
    fits = [k for k in (64, 32, 8) if plan.cache_disk[f"compact k={k}"] <= 0.5 * plan.disk_free]
    rec["k"] = min(fits[0] if fits else 8, s.vocab)
    rec["k_reason"] = "compact k=64: top-1 kept, <= 150 B/token" if rec["k"] == 64 else "disk space is short"
    rec["chunk_size"], rec["chunk_reason"] = _pick_chunk(plan, s, cfg, chunk, room)
    if plan.cache_total > room:
        rec["warning"] = "even without the teacher this exceeds the budget: lower train.batch_size or data.seq_len"
    return rec


def _pick_chunk(plan: Plan, s: ModelShape, cfg: DistillConfig, chunk: int, room: float) -> tuple[int, str]:
    """The default chunk (~2^24 logits), halved while the fused loss pushes the run over the budget (min 16)."""
    if not cfg.loss.fused:
        return chunk, "loss.fused is off: set loss.fused=true to drop the [tokens x V] logits"
    total = plan.online_total if plan.online_total is not None and plan.online_total <= room else plan.cache_total
    picked = chunk
    copies = FUSED_COPIES if cfg.teacher_kind is not None else CE_COPIES
    while picked > 16 and total > room:
        total -= copies * (picked // 2) * s.vocab * 4
        picked //= 2
    reason = (
        "default (~2^24 logits or the micro-batch, fast GEMMs)"
        if picked == chunk
        else "halved to fit the memory budget (slower)"
    )
    return picked, reason


def _gib(n: float) -> str:
    """A size for the table: GiB, or MiB below 1 GiB."""
    return f"{n / GIB:8.2f} GiB" if n >= GIB else f"{n / MIB:8.1f} MiB"


def format_plan(plan: Plan) -> str:
    """A readable table of the plan."""
    rows = [f"student {plan.student_params / 1e6:.1f}M params, vocab {plan.student_vocab}"]
    if plan.teachers == 1:
        rows.append(f"teacher {plan.teacher_params / 1e6:.1f}M params")
    elif plan.teachers > 1:
        rows.append(f"{plan.teachers} teachers {plan.teacher_params / 1e6:.1f}M params together")
    rows += ["", "memory (peak RSS)"] + [f"  {name:<22}{_gib(size)}" for name, size in plan.memory.items()]
    if plan.online_total is not None:
        rows.append(f"  {'total, online teacher':<22}{_gib(plan.online_total)}")
    rows.append(f"  {'total, cached teacher':<22}{_gib(plan.cache_total)}")
    rows.append(f"  {'budget':<22}{_gib(plan.budget)}")
    rows += ["", f"data {plan.data_bytes / MIB:.1f} MiB JSONL ~ {plan.data_tokens:,} tokens; cache on disk:"]
    rows += [f"  {name:<22}{_gib(size)}" for name, size in plan.cache_disk.items()]
    rows.append(f"  {'disk free':<22}{_gib(plan.disk_free)}")
    rows += ["", *_format_time(plan)]
    rows += ["", "recommend"] + [f"  {key:<22}{value}" for key, value in plan.recommend.items()]
    return "\n".join(rows)


def _format_time(plan: Plan) -> list[str]:
    """The time rows: the probe's parts (fixed + per layer), seconds per step, the whole run."""
    if plan.probe is None:
        return ["time: not probed (--no-probe, or the run needs more than this machine's memory)"]
    p = plan.probe
    rows = [
        f"time ({plan.tokens_per_step:,} tokens/step; probe {p['seconds']:.1f} s at 1 and 2 layers,"
        f" {p['compute_dtype']} matmuls)"
    ]
    parts = [(f"teacher t{k}" if len(p["teacher"]) > 1 else "teacher", pair) for k, pair in enumerate(p["teacher"])]
    parts += [(name, p[name]) for name in PROBE_PARTS if name != "teacher"]
    rows += [f"  {name:<22}{fixed:8.3f} s + {per_layer:.3f} s/layer" for name, (fixed, per_layer) in parts]
    cached = "step, no teacher" if plan.online_total is None else "step, cached teacher"
    names = {"cache": cached, "online": "step, online teacher", "logging_extra": "each logging step +"}
    rows += [f"  {names[key]:<22}{sec:8.2f} s" for key, sec in plan.step_seconds.items()]
    runs = plan.run_seconds.items()
    rows += [f"  {'run, ' + names[key].removeprefix('step, '):<22}{sec / 60:8.1f} min" for key, sec in runs]
    return rows


def plan_cli(
    config: Path | None, overrides: list[str], memory_gb: float | None, students: int, as_json: bool, probe: bool = True
) -> str:
    """`potstill plan`: load the config like `potstill distill`, estimate, and return the table or JSON."""
    from potstill.config import load_config

    cfg = load_config(config, overrides)
    budget = None if memory_gb is None else int(memory_gb * GIB)
    plan = plan_config(cfg, memory_bytes=budget, students=students, probe=probe)
    return plan.to_json() if as_json else format_plan(plan)
