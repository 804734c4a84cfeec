"""Pre-flight estimate of a distillation run (`potstill plan`): memory, disk and time, before any model is loaded.

Everything comes from the distill config, the models' `config.json` (and the student's `potstill_vocab.json`),
file sizes and a few seconds of probing; no weights are read. The plan answers: does the online teacher fit
beside the student in this machine's memory, or should it be cached on disk first (`potstill cache build`)?
Which k, and which chunk size for the fused loss?

Memory model (float32 training with AdamW, what `run_distill` does; peak resident memory):
- runtime: the Python process with torch + transformers + accelerate imported (`RUNTIME_BYTES`, measured);
- student: weights + grads + AdamW's two moments = 4 copies of the parameters (16 bytes/param in float32);
- activations saved for backward: per layer `tokens x (ACT_HIDDEN x H + ACT_MLP x I)` values, plus one
  transient attention score matrix `batch x heads x seq^2` (sdpa keeps no score matrix for backward);
- loss: dense = `DENSE_COPIES` (KD) or `CE_COPIES` (CE only) `[tokens, V]` float32 tensors; fused = the
  head's gradient buffer `[V, H]` + `FUSED_COPIES` chunk buffers `[chunk, V]` (see `losses/fused.py`);
- teacher (online only): weights, a `[V_student, H]` copy of its head rows when the student has an id map,
  and no-grad activations of one layer at a time.

Disk: cache bytes/token per encoding and k from the measured table in benchmarks/README.md ("Teacher cache").
Time: a probe trains the run itself, shrunk in depth. The student (and the online teacher) are built from their
`config.json` with 1 and 2 decoder layers and random weights, in the run's dtypes and autocast; on a random batch
of the run's shape, each depth runs real micro-steps: the teacher's no-grad forward (its head cut to the
student's vocabulary, as an id map leaves it), the student's forward and the run's loss (fused or dense, KD or CE
only, through `fused_kd_terms` / `kd_terms`), the backward, then gradient clipping and AdamW. For each part,
per-layer seconds = t(2) - t(1) and fixed seconds = t(1) - per-layer (embedding, head, loss, optimizer over
the embedding, framework overhead); the plan scales them to the real depths: a step is grad_accum x (teacher +
forward + backward) + optimizer, and logging steps add the trainer's two gradient-ratio backward passes. The
probe measures the machine's load at that moment (benchmarks/README.md, "Plan vs measured").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from potstill.config import DistillConfig
from potstill.errors import UserError

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
PROBE_SECONDS = 2.0
PROBE_REPEATS = (2, 6)
PROBE_PARTS = ("teacher", "forward", "loss", "backward", "optimizer")  # the timed parts of a step, in order
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


def id_map_size(student_dir: str | Path) -> int | None:
    """Rows of the student's id map (`potstill_vocab.json`), or None when it has none."""
    path = Path(student_dir) / "potstill_vocab.json"
    if not path.is_file():
        return None
    try:
        return len(json.loads(path.read_text())["teacher_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: expected {{'teacher_vocab_size': int, 'teacher_ids': [int, ...]}}") from None


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
    kd = cfg.loss.alpha != 0
    if cfg.loss.fused:
        loss = s.vocab * s.hidden * 4 + (FUSED_COPIES if kd else CE_COPIES) * min(chunk, tokens) * s.vocab * 4
    else:
        loss = (DENSE_COPIES if kd else CE_COPIES) * tokens * s.vocab * 4
    return {"student_weights": s.params * elem, "student_grads_adamw": 3 * s.params * elem,
            "activations": acts + scores, "loss": loss}  # fmt: skip


def _teacher_memory(t: ModelShape, s: ModelShape, cfg: DistillConfig, has_map: bool) -> int:
    """Bytes of an online teacher: weights, a head copy for an id map, one layer's no-grad activations."""
    elem = DTYPE_BYTES[cfg.model.teacher_load_dtype]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    head_copy = s.vocab * t.hidden * elem if has_map else 0
    scores = cfg.train.batch_size * t.heads * cfg.data.seq_len**2 * 4
    acts = tokens * (3 * t.hidden + 2 * t.intermediate) * elem + scores
    return t.params * elem + head_copy + acts


@dataclass(frozen=True)
class StepProbe:
    """Seconds of a training step's parts on this machine now, each as (fixed, per decoder layer).

    Attributes:
        teacher: the online teacher's no-grad forward per micro-step, or (0, 0) without one.
        forward: the student's forward per micro-step (without its head on the fused path).
        loss: the loss per micro-step (fused: the student's and the teacher's head rows chunk by chunk, and the
            gradient of the logits; dense: the divergence and CE on full logits).
        backward: the backward through the student, per micro-step.
        optimizer: gradient clipping, AdamW step and zero_grad, once per optimizer step.
        compute_dtype: dtype of the student's matmuls (autocast's under mixed precision, else the weights').
        seconds: the probe's own wall time, model builds included.
    """

    teacher: tuple[float, float]
    forward: tuple[float, float]
    loss: tuple[float, float]
    backward: tuple[float, float]
    optimizer: tuple[float, float]
    compute_dtype: str
    seconds: float


def _at(part: tuple[float, float], layers: int) -> float:
    """Seconds of a (fixed, per-layer) part at `layers` decoder layers."""
    return part[0] + layers * part[1]


def _split(one: float, two: float) -> tuple[float, float]:
    """(fixed, per-layer) from the times at 1 and 2 layers; noise (two < one) never makes a part negative."""
    per_layer = max(two - one, 0.0)
    return max(one - per_layer, 0.0), per_layer


def probe_step(cfg: DistillConfig, vocab: int, teacher: bool, seconds: float = PROBE_SECONDS) -> StepProbe:
    """Time real training micro-steps of the run's shape, with the student (and teacher) cut to 1 and 2 layers.

    The models come from their `config.json` with random weights (no weights read); the teacher's vocabulary is
    cut to the student's `vocab` rows, which is what an id map leaves of its head (embedding lookups cost the same
    whatever the rows). Micro-steps alternate between the depths, so a change of the machine's load hits both.

    Args:
        cfg: the run's config (dtypes, mixed precision, batch shape, loss path, optimizer settings).
        vocab: the student's vocabulary size.
        teacher: also run the online teacher (`model.teacher`).
        seconds: timed micro-steps stop after this (within `PROBE_REPEATS` per depth).
    """
    import torch

    from potstill.teacher.online import OnlineTeacher

    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where run_distill's Trainer puts the models
    students = {n: m.to(device).train() for n, m in _random_models(cfg.model.student, cfg.model.dtype, vocab).items()}
    teachers = {n: None for n in students}
    if teacher:
        built = _random_models(cfg.model.teacher, cfg.model.teacher_load_dtype, vocab)
        teachers = {n: OnlineTeacher(m.to(device)) for n, m in built.items()}
    # The Trainer's adamw_torch_fused, with its two parameter groups (weight decay on matrices, none on norms/biases);
    # parameters without a gradient (the other depth's layers) are skipped by each step.
    params = list({id(p): p for m in students.values() for p in m.parameters()}.values())
    groups = [[p for p in params if (p.ndim > 1) == decay] for decay in (True, False)]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups if g], lr=cfg.train.lr, fused=True)
    ids = torch.randint(vocab, (cfg.train.batch_size, cfg.data.seq_len), device=device)
    autocast = _autocast_dtype(cfg)
    step = partial(_micro_step, cfg, optimizer, ids, autocast)
    for n in (1, 2):
        step(students[n], teachers[n])  # warm-up: allocations, kernel choice, AdamW state
    runs: dict[int, list[list[float]]] = {1: [], 2: []}
    timed = time.perf_counter()
    while len(runs[1]) < PROBE_REPEATS[0] or (
        len(runs[1]) < PROBE_REPEATS[1] and time.perf_counter() - timed < seconds
    ):
        for n in (1, 2):
            runs[n].append(step(students[n], teachers[n]))
    one, two = ([statistics.median(part) for part in zip(*runs[n], strict=True)] for n in (1, 2))
    parts = [_split(a, b) for a, b in zip(one, two, strict=True)]
    dtype = str(autocast or students[1].dtype).removeprefix("torch.")
    return StepProbe(*parts, compute_dtype=dtype, seconds=time.perf_counter() - start)


def _random_models(model_dir: str, dtype: str, vocab: int) -> dict:
    """Causal LMs of `model_dir`'s architecture with 1 and 2 decoder layers and random weights (reads config.json).

    Both have `vocab` rows and share one embedding and head: a big vocabulary's rows are built (and cost AdamW
    time) once, as in the real model.

    Returns:
        {1: model, 2: model}.
    """
    two = _random_model(model_dir, dtype, vocab, layers=2)
    one = _random_model(model_dir, dtype, 8, layers=1)  # 8 rows: replaced by the shared ones just below
    one.set_input_embeddings(two.get_input_embeddings())
    one.set_output_embeddings(two.get_output_embeddings())
    one.config.get_text_config().vocab_size = vocab
    return {1: one, 2: two}


def _random_model(model_dir: str, dtype: str, vocab: int, layers: int):
    """A causal LM of `model_dir`'s architecture with `layers` layers, `vocab` rows and random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    text.num_hidden_layers, text.vocab_size = layers, vocab
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    if (text.pad_token_id or 0) >= vocab:  # a pad id past the cut vocabulary would break the embedding
        text.pad_token_id = None
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def _autocast_dtype(cfg: DistillConfig):
    """The autocast dtype `run_distill`'s Trainer uses (bf16 also when the student is bfloat16), or None."""
    import torch

    if cfg.train.mixed_precision == "fp16":
        return torch.float16
    if cfg.train.mixed_precision == "bf16" or cfg.model.dtype == "bfloat16":
        return torch.bfloat16
    return None


def _micro_step(cfg: DistillConfig, optimizer, ids, autocast, student, teacher) -> list[float]:
    """One micro-step and optimizer step as `DistillTrainer` runs them.

    Args:
        optimizer: AdamW over the student's parameters.
        ids: [B, L] token ids (also the labels).
        autocast: the autocast dtype, or None.
        student: the student (train mode).
        teacher: an `OnlineTeacher`, or None.

    Returns:
        Seconds of [teacher forward, student forward, loss, backward, clip + AdamW + zero_grad].
    """
    import torch

    marks = [_clock(ids)]
    mask = ids.new_ones(ids.shape)
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        head = _fused_head(cfg, student)
        view = None if teacher is None else _teacher_view(teacher, ids, mask, fused=head is not None)
        marks.append(_clock(ids))
        fused = head is not None and not isinstance(view, torch.Tensor)  # as DistillTrainer.compute_loss
        if fused:  # the final hidden states (the head's input), no [B, L, V] logits
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        else:
            out = student(input_ids=ids, attention_mask=mask)
        marks.append(_clock(ids))
        loss = _loss(cfg, out, view, head if fused else None, ids)
        marks.append(_clock(ids))
    loss.backward()
    marks.append(_clock(ids))
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    marks.append(_clock(ids))
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _clock(like) -> float:
    """time.perf_counter() once the device of `like` has finished its queued work."""
    if like.is_cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _fused_head(cfg: DistillConfig, student):
    """(head weight, softcap) when the run takes the fused path (as `DistillTrainer._student_head`), else None."""
    from potstill.models.heads import head_of

    return head_of(student) if cfg.loss.fused else None


def _teacher_view(teacher, ids, mask, fused: bool):
    """As `DistillTrainer._teacher_view` (online): a `TeacherHead` for the fused loss, else [B, L, V] logits."""
    view = teacher.head_inputs(ids, mask) if fused else None
    return teacher.logits(ids, mask) if view is None else view


def _loss(cfg: DistillConfig, out, view, head, ids):
    """The run's scalar loss, as `DistillTrainer._fused_terms` / `_dense_terms` compute it (labels = ids).

    Args:
        out: the student's outputs (final hidden states for the fused loss, else logits).
        view: the teacher (`TeacherHead`, logits) or None.
        head: the student's (head weight, softcap) on the fused path, else None.
        ids: [B, L] token ids.
    """
    from dataclasses import replace

    from potstill.losses import combine, kd_terms
    from potstill.losses.fused import fused_kd_terms

    # no teacher view: CE only (alpha = 0), or a cached teacher, whose top-k loss the probe leaves out
    alpha = 0.0 if view is None else 0.5 if cfg.loss.alpha == "auto" else cfg.loss.alpha
    if head is None:
        return combine(kd_terms(out.logits, view, ids, cfg.loss), alpha, cfg.loss.temperature)
    hidden = out.hidden_states[-1][:, :-1]
    if view is not None:
        view = replace(view, hidden=view.hidden[:, :-1].reshape(-1, view.hidden.shape[-1]))
    terms = fused_kd_terms(
        hidden.reshape(-1, hidden.shape[-1]),
        head[0],
        view,
        ids[:, 1:].reshape(-1),
        cfg.loss,
        chunk_size=cfg.loss.chunk_size,
        softcap=head[1],
        loss_weights=(alpha * cfg.loss.temperature**2, 1 - alpha),
    )
    return combine(terms, alpha, cfg.loss.temperature)


def _step_seconds(probe: StepProbe, s: ModelShape, t: ModelShape | None, cfg: DistillConfig) -> dict[str, float]:
    """Seconds per optimizer step from the probe, scaled to the real depths.

    Returns:
        `cache`: without a teacher forward (a cached teacher, or CE only); `online`: with it; `logging_extra`: the
        two extra backward passes `DistillTrainer` takes on each logging step to log the KD/CE gradient ratio (the
        fused loss recomputes its chunks in each: its loss time again).
    """
    micro = sum(_at(part, s.layers) for part in (probe.forward, probe.loss, probe.backward))
    step = {"cache": cfg.train.grad_accum * micro + _at(probe.optimizer, s.layers)}
    if t is not None:
        step["online"] = step["cache"] + cfg.train.grad_accum * _at(probe.teacher, t.layers)
    extra = _at(probe.backward, s.layers) + (_at(probe.loss, s.layers) if cfg.loss.fused else 0.0)
    step["logging_extra"] = 2 * extra if cfg.loss.alpha != 0 else 0.0
    return step


@dataclass
class Plan:
    """The estimate; every size in bytes, times in seconds. `to_json()` is what `potstill plan --json` prints."""

    student_params: int
    teacher_params: int | None
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
    kd = cfg.loss.alpha != 0
    t = read_shape(cfg.model.teacher, "teacher") if kd and cfg.model.teacher else None
    has_map = id_map_size(cfg.model.student) is not None
    budget = memory_bytes or memory_budget()
    micro_tokens = cfg.train.batch_size * cfg.data.seq_len
    chunk = min(cfg.loss.chunk_size or max(8, CHUNK_ELEMENTS // s.vocab), micro_tokens)
    memory = {"runtime": RUNTIME_BYTES, **_student_memory(s, cfg, chunk)}
    cache_total = sum(memory.values())
    teacher_bytes = _teacher_memory(t, s, cfg, has_map) if t is not None else None
    if teacher_bytes is not None:
        memory["teacher_online"] = teacher_bytes
    online_total = None if teacher_bytes is None else cache_total + teacher_bytes
    data_bytes, n_tokens = data_tokens(cfg.data.train)
    cache_disk = {f"{enc} k={k}": cache_bytes_per_token(k, enc) * n_tokens for enc in CACHE_BYTES for k in (8, 32, 64)}
    out_dir = Path(cfg.train.output_dir).resolve()
    disk_free = shutil.disk_usage(next(p for p in (out_dir, *out_dir.parents) if p.exists())).free
    timing = probe_step(cfg, s.vocab, teacher=t is not None) if probe and cache_total <= memory_budget() else None
    step = {} if timing is None else _step_seconds(timing, s, t, cfg)
    logged = math.ceil(cfg.train.max_steps / cfg.train.logging_steps)  # the last step always logs
    run = {k: cfg.train.max_steps * v + logged * step["logging_extra"] for k, v in step.items() if k != "logging_extra"}
    plan = Plan(
        student_params=s.params,
        teacher_params=None if t is None else t.params,
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
    copies = FUSED_COPIES if cfg.loss.alpha != 0 else CE_COPIES
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
    if plan.teacher_params is not None:
        rows.append(f"teacher {plan.teacher_params / 1e6:.1f}M params")
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
    rows += [f"  {name:<22}{p[name][0]:8.3f} s + {p[name][1]:.3f} s/layer" for name in PROBE_PARTS]
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


_MEASURE = """
import json, re, sys, time
from pathlib import Path
from potstill.config import DistillConfig
from potstill.train import trainer

class Clocked(trainer.JsonlLogger):  # the run's logger, also noting when each optimizer step ends
    ends = []
    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

trainer.JsonlLogger = Clocked
start = time.perf_counter()
trainer.run_distill(DistillConfig.model_validate_json(sys.stdin.read()))
steps = [b - a for a, b in zip(Clocked.ends, Clocked.ends[1:])]
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
print(json.dumps([peak, time.perf_counter() - start, steps]))
"""


class Measured(NamedTuple):
    """What `measure_run` saw: peak RSS (bytes), wall seconds (loading included), and the seconds of optimizer steps
    2, 3, ... (each from the end of the previous step to its own end; step 1 holds the warm-up)."""

    peak: int
    seconds: float
    steps: list[float]

    def step_seconds(self, cfg: DistillConfig) -> tuple[float, float]:
        """(median seconds of the steps 2.. that do not log, the last step's extra over it) of a run of `cfg`.

        Every `train.logging_steps`-th step and the last one log (and take the gradient-ratio passes).
        """
        last, every = cfg.train.max_steps, cfg.train.logging_steps
        plain = statistics.median(s for step, s in enumerate(self.steps, start=2) if step % every and step != last)
        return plain, self.steps[-1] - plain


def measure_run(cfg: DistillConfig, timeout: float = 600) -> Measured:
    """Peak RSS, wall time and step times of `run_distill(cfg)` in a fresh subprocess (what the plan estimates).

    Used to check the plan (tests/test_plan.py, benchmarks/bench_plan.py); it really trains. Logging steps
    (every `train.logging_steps` and the last) take the gradient-ratio passes on top of a plain step. The peak is
    the process's own high-water mark (`VmHWM`, Linux): `ru_maxrss` keeps the parent's peak across fork + exec.
    """
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE], input=cfg.model_dump_json(), capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"run_distill failed:\n{proc.stderr[-2000:]}")
    return Measured(*json.loads(proc.stdout.splitlines()[-1]))
