"""Pre-flight estimate of a distillation run (`potstill plan`): memory, disk and time, before any model is loaded.

Everything comes from the distill config, the models' `config.json` (and the student's `potstill_vocab.json`),
file sizes and one short matmul probe; no weights are read. The plan answers: does the online teacher fit
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
Time: FLOPs per optimizer step = 6 x student matmul params x tokens (+ attention) + 2 x teacher matmul params
x tokens (online), divided by the GFLOP/s a short GEMM probe reaches on this machine now, plus the loss's
elementwise work, `LOSS_PASSES x tokens x V` at the speed of a probed log_softmax. The probes follow the
machine's current load: read it as the order of magnitude (benchmarks/README.md, "Plan vs measured").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
# Elementwise passes over [tokens, V] per optimizer step (softmaxes, divergence, its gradient, CE, fresh-page
# faults), in units of one log_softmax: calibrated on a V = 32,768 run (benchmarks/README.md, "Plan vs measured").
# (dense, fused): the fused loss writes no fresh [tokens, V] tensors (measured 0.74 vs 3.62 s/step there).
LOSS_PASSES_KD = {False: 20, True: 4}
LOSS_PASSES_CE = {False: 8, True: 2}
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

    def matmul_params(self, head_rows: int | None = None) -> int:
        """Parameters used in matmuls per token: the layers and the head (`head_rows` rows of it)."""
        return self.layers * self.layer_params + (head_rows or self.vocab) * self.hidden


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


def _rate(fn, work: float, seconds: float) -> float:
    """Work units per second of `fn()`, after one warm-up call (allocation, kernel choice)."""
    fn()
    start, runs = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        fn()
        runs += 1
    return work * runs / elapsed


def probe_speed(hidden: int, intermediate: int, vocab: int, seconds: float = 0.2) -> tuple[float, float]:
    """This machine's speed now: (GFLOP/s of a float32 GEMM shaped like one student MLP projection on 256
    tokens (at least 512 x 2048: tiny shapes measure call overhead), million elements/s of a log_softmax over
    [256, min(V, 32768)] logits)."""
    import torch

    hidden, intermediate = max(hidden, 512), max(intermediate, 2048)
    a, b = torch.randn(256, hidden), torch.randn(hidden, intermediate)
    logits = torch.randn(256, min(vocab, 32768))
    gflops = _rate(lambda: a @ b, 2 * 256 * hidden * intermediate / 1e9, seconds)
    return gflops, _rate(lambda: torch.log_softmax(logits, -1), logits.numel() / 1e6, seconds)


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


def _step_flops(s: ModelShape, t: ModelShape | None, cfg: DistillConfig) -> tuple[float, float]:
    """(student, online teacher) FLOPs of one optimizer step: 6 N P + attention; 2 N P for the teacher."""
    tokens = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    attn = 4 * s.layers * cfg.data.seq_len * s.heads * s.head_dim  # QK^T and AV per token, forward
    student = 6 * tokens * s.matmul_params() + 3 * tokens * attn
    teacher = 0.0 if t is None else 2 * tokens * t.matmul_params(head_rows=s.vocab)
    return student, teacher


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
    gflops: float
    loss_melems_per_s: float
    step_seconds: dict[str, float]
    recommend: dict[str, object]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def plan_config(cfg: DistillConfig, memory_bytes: int | None = None, students: int = 1, probe: bool = True) -> Plan:
    """Estimate memory, disk and time of `run_distill(cfg)` and recommend online vs cache, k and chunk size.

    Args:
        cfg: the distill config (as `potstill distill` would run it).
        memory_bytes: memory budget (default: this machine's RAM).
        students: how many students will distill from this teacher on this data (> 1 favours a cache).
        probe: time a GEMM for the step time (False: no torch import, step times are 0).

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
    gflops, melems = probe_speed(s.hidden, s.intermediate, s.vocab) if probe else (0.0, 0.0)
    f_student, f_teacher = _step_flops(s, t, cfg)
    passes = (LOSS_PASSES_KD if kd else LOSS_PASSES_CE)[cfg.loss.fused]
    loss_s = passes * cfg.train.grad_accum * micro_tokens * s.vocab / (melems * 1e6 or math.inf)
    step = {"cache": f_student / (gflops * 1e9 or math.inf) + loss_s}
    if t is not None:
        step["online"] = step["cache"] + f_teacher / (gflops * 1e9 or math.inf)
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
        gflops=gflops,
        loss_melems_per_s=melems,
        step_seconds=step,
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
    rows += [
        "",
        f"time ({plan.tokens_per_step:,} tokens/step; probes: {plan.gflops:.1f} GFLOP/s,"
        f" {plan.loss_melems_per_s:.0f}M softmax elements/s)",
    ]
    rows += [f"  {name:<22}{sec:8.2f} s/step" for name, sec in plan.step_seconds.items()]
    rows += ["", "recommend"] + [f"  {key:<22}{value}" for key, value in plan.recommend.items()]
    return "\n".join(rows)


def plan_cli(config: Path | None, overrides: list[str], memory_gb: float | None, students: int, as_json: bool) -> str:
    """`potstill plan`: load the config like `potstill distill`, estimate, and return the table or JSON."""
    from potstill.config import load_config

    cfg = load_config(config, overrides)
    plan = plan_config(cfg, memory_bytes=None if memory_gb is None else int(memory_gb * GIB), students=students)
    return plan.to_json() if as_json else format_plan(plan)


_MEASURE = """
import resource, sys, time
from potstill.config import DistillConfig
from potstill.train.trainer import run_distill
start = time.perf_counter()
run_distill(DistillConfig.model_validate_json(sys.stdin.read()))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - start)
"""


def measure_run(cfg: DistillConfig, timeout: float = 600) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `run_distill(cfg)` in a fresh subprocess (what the plan estimates).

    Used to check the plan (tests/test_plan.py, benchmarks/bench_plan.py); it really trains. The seconds
    include loading models and data: difference two runs with different `train.max_steps` for a step time.
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
    peak, seconds = proc.stdout.split()[-2:]
    return int(peak), float(seconds)
