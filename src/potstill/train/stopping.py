"""A graceful stop of `potstill distill` on SIGTERM or SIGINT: finish the optimizer step, save a checkpoint, stop.

The signal handler only records the signal (no writes inside a handler: it may interrupt one) and puts the
previous handlers back, so a second signal acts as before (SIGINT raises KeyboardInterrupt, SIGTERM kills): a user
who cannot wait for the step to end is never stuck. At the end of each optimizer step `GracefulStop` asks the
Trainer to save a checkpoint and stop; `run_distill` then raises `potstill.errors.Stopped`. Under several
processes the ranks agree (a max over ranks) so they stop after the same step, whichever of them got the signal.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(TrainerCallback):
    """Installed around `trainer.train()` (`with stop:`); `signum` is the signal received, or 0."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum
        if args.world_size > 1 and dist.is_initialized():  # every rank must stop after the same step
            flag = torch.tensor([signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = self.signum = int(flag.item())
        if signum:
            control.should_save = True
            control.should_training_stop = True
        return control
