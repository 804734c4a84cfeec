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
  and no-grad activations of one layer at a time; several teachers (`model.teachers`): each one's weights and
  head copy, and the largest one's layer activations (they run in turn).

Disk: cache bytes/token per encoding and k from the measured table in benchmarks/README.md ("Teacher cache").
Time: a probe trains the run itself, shrunk in depth (`plan/probe.py`). The student (and the online teacher) are
built from their `config.json` with 1 and 2 decoder layers and random weights, in the run's dtypes and autocast;
on a random batch of the run's shape, each depth runs real micro-steps through training's own KD step
(`potstill.train.step`): the teacher's no-grad forward (its head cut to the student's vocabulary, as an id map
leaves it), the student's forward and the run's loss (fused or dense, KD or CE only), the backward, then
gradient clipping and AdamW. For each part,
per-layer seconds = t(2) - t(1) and fixed seconds = t(1) - per-layer (embedding, head, loss, optimizer over
the embedding, framework overhead); the plan scales them to the real depths: a step is grad_accum x (teacher +
forward + backward) + optimizer (with several teachers, each teacher's forward, every one on every row), and
logging steps add the trainer's two gradient-ratio backward passes. The
probe measures the machine's load at that moment (benchmarks/README.md, "Plan vs measured").
Modules: `estimate.py` (shapes, memory, disk, the plan and its table), `probe.py` (the step-time probe),
`measure.py` (a real run in a fresh process, to check the plan against).
"""

from potstill.plan.estimate import (
    CACHE_BYTES,
    GIB,
    MIB,
    ModelShape,
    Plan,
    cache_bytes_per_token,
    format_plan,
    plan_cli,
    plan_config,
    read_shape,
    recommend,
)
from potstill.plan.measure import Measured, measure_run
from potstill.plan.probe import StepProbe, probe_step, random_models, step_seconds

__all__ = [
    "CACHE_BYTES",
    "GIB",
    "MIB",
    "Measured",
    "ModelShape",
    "Plan",
    "StepProbe",
    "cache_bytes_per_token",
    "format_plan",
    "measure_run",
    "plan_cli",
    "plan_config",
    "probe_step",
    "random_models",
    "read_shape",
    "recommend",
    "step_seconds",
]
