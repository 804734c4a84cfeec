"""The step-time probe of `potstill plan`: real training micro-steps of the run, shrunk in depth.

The student (and the online teachers) are built from their `config.json` with 1 and 2 decoder layers and random
weights, in the run's dtypes and autocast; on a random batch of the run's shape, each depth runs real
micro-steps through the KD step of training (`potstill.train.step`: the teacher's targets, the student's
forward, the loss terms), then the backward, gradient clipping and AdamW. For each part, per-layer seconds =
t(2) - t(1) and fixed seconds = t(1) - per-layer; `step_seconds` scales them to the real depths. torch is
imported only when a probe runs (`potstill plan --no-probe` stays light).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

from potstill.config import DistillConfig

PROBE_SECONDS = 2.0
PROBE_REPEATS = (2, 6)
PROBE_PARTS = ("teacher", "forward", "loss", "backward", "optimizer")  # the timed parts of a step, in order


@dataclass(frozen=True)
class StepProbe:
    """Seconds of a training step's parts on this machine now, each as (fixed, per decoder layer).

    Attributes:
        teacher: each online teacher's no-grad forward per micro-step, one pair per teacher (`model.teacher`, or
            each of `model.teachers` in order; none without an online teacher).
        forward: the student's forward per micro-step (without its head on the fused path).
        loss: the loss per micro-step (fused: the student's and the teacher's head rows chunk by chunk, and the
            gradient of the logits; dense: the divergence and CE on full logits).
        backward: the backward through the student, per micro-step.
        optimizer: gradient clipping, AdamW step and zero_grad, once per optimizer step.
        compute_dtype: dtype of the student's matmuls (autocast's under mixed precision, else the weights').
        seconds: the probe's own wall time, model builds included.
    """

    teacher: tuple[tuple[float, float], ...]
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


def probe_step(cfg: DistillConfig, vocab: int, teachers: list[str], seconds: float = PROBE_SECONDS) -> StepProbe:
    """Time real training micro-steps of the run's shape, with the student (and teachers) cut to 1 and 2 layers.

    The models come from their `config.json` with random weights (no weights read); the teacher's vocabulary is
    cut to the student's `vocab` rows, which is what an id map leaves of its head (embedding lookups cost the same
    whatever the rows). Micro-steps alternate between the depths, so a change of the machine's load hits both.

    Args:
        cfg: the run's config (dtypes, mixed precision, batch shape, loss path, optimizer settings).
        vocab: the student's vocabulary size.
        teachers: the online teachers' model directories to run too, each in turn (empty: none). The loss takes
            the first one's targets only: with several teachers it is one teacher's term.
        seconds: timed micro-steps stop after this (within `PROBE_REPEATS` per depth).
    """
    import torch

    from potstill.teacher.online import OnlineTeacher

    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where run_distill's Trainer puts the models
    students = {n: m.to(device).train() for n, m in random_models(cfg.model.student, cfg.model.dtype, vocab).items()}
    built = [random_models(path, cfg.model.teacher_load_dtype, vocab) for path in teachers]
    online = {n: [OnlineTeacher(models[n].to(device)) for models in built] for n in students}
    # The Trainer's adamw_torch_fused, with its two parameter groups (weight decay on matrices, none on norms/biases);
    # parameters without a gradient (the other depth's layers) are skipped by each step.
    params = list({id(p): p for m in students.values() for p in m.parameters()}.values())
    groups = [[p for p in params if (p.ndim > 1) == decay] for decay in (True, False)]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups if g], lr=cfg.train.lr, fused=True)
    ids = torch.randint(vocab, (cfg.train.batch_size, cfg.data.seq_len), device=device)
    autocast = _autocast_dtype(cfg)
    step = partial(_micro_step, cfg, optimizer, ids, autocast)
    for n in (1, 2):
        step(students[n], online[n])  # warm-up: allocations, kernel choice, AdamW state
    runs: dict[int, list[list[float]]] = {1: [], 2: []}
    timed = time.perf_counter()
    while len(runs[1]) < PROBE_REPEATS[0] or (
        len(runs[1]) < PROBE_REPEATS[1] and time.perf_counter() - timed < seconds
    ):
        for n in (1, 2):
            runs[n].append(step(students[n], online[n]))
    one, two = ([statistics.median(part) for part in zip(*runs[n], strict=True)] for n in (1, 2))
    parts = [_split(a, b) for a, b in zip(one, two, strict=True)]
    dtype = str(autocast or students[1].dtype).removeprefix("torch.")
    k = len(teachers)
    return StepProbe(tuple(parts[:k]), *parts[k:], compute_dtype=dtype, seconds=time.perf_counter() - start)


def random_models(model_dir: str, dtype: str, vocab: int) -> dict:
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


def _micro_step(cfg: DistillConfig, optimizer, ids, autocast, student, teachers: list) -> list[float]:
    """One micro-step and optimizer step as `DistillTrainer` runs them (the KD step of `potstill.train.step`).

    Args:
        optimizer: AdamW over the student's parameters.
        ids: [B, L] token ids (also the labels).
        autocast: the autocast dtype, or None.
        student: the student (train mode).
        teachers: `OnlineTeacher`s, each run in turn (the loss takes the first one's targets), or none.

    Returns:
        Seconds of [each teacher's forward..., student forward, loss, backward, clip + AdamW + zero_grad].
    """
    import torch

    from potstill.losses import combine, kd_weights
    from potstill.train.step import loss_terms, student_head, student_outputs, takes_fused_path, teacher_targets

    # no teacher: CE only (alpha = 0), or a cached teacher, whose top-k loss the probe leaves out
    alpha = 0.0 if not teachers else 0.5 if cfg.loss.alpha == "auto" else cfg.loss.alpha
    inputs = {"input_ids": ids, "attention_mask": ids.new_ones(ids.shape), "labels": ids}
    marks = [_clock(ids)]
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        head = student_head(student, cfg.loss)
        each = []
        for teacher in teachers:
            each.append(teacher_targets(teacher, inputs, fused=head is not None))
            marks.append(_clock(ids))
        targets = each[0] if each else None
        fused = takes_fused_path(head, targets)
        outputs = student_outputs(student, inputs, fused)
        marks.append(_clock(ids))
        weights = kd_weights(alpha, cfg.loss.temperature)
        terms = loss_terms(outputs, ids, targets, head if fused else None, cfg.loss, None, weights)
        loss = combine(terms, alpha, cfg.loss.temperature)
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


def step_seconds(probe: StepProbe, s, ts: list, cfg: DistillConfig) -> dict[str, float]:
    """Seconds per optimizer step from the probe, scaled to the real depths.

    Args:
        probe: the probe's parts.
        s: the student's `ModelShape` (its depth); ts: the online teachers' (in the probe's order), or none.
        cfg: the run's config (grad_accum, loss path).

    Returns:
        `cache`: without a teacher forward (a cached teacher, or CE only); `online`: with every teacher's forward
        (each on every row: an upper bound where `model.teachers` routes domains); `logging_extra`: the two extra
        backward passes `DistillTrainer` takes on each logging step to log the KD/CE gradient ratio (the fused loss
        recomputes its chunks in each: its loss time again).
    """
    micro = sum(_at(part, s.layers) for part in (probe.forward, probe.loss, probe.backward))
    step = {"cache": cfg.train.grad_accum * micro + _at(probe.optimizer, s.layers)}
    if ts:
        teachers = sum(_at(part, t.layers) for part, t in zip(probe.teacher, ts, strict=True))
        step["online"] = step["cache"] + cfg.train.grad_accum * teachers
    extra = _at(probe.backward, s.layers) + (_at(probe.loss, s.layers) if cfg.loss.fused else 0.0)
    step["logging_extra"] = 2 * extra if cfg.teacher_kind is not None else 0.0
    return step
