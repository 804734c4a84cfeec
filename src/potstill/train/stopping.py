"""A graceful stop of `potstill distill` on SIGTERM or SIGINT: finish the optimizer step, save a checkpoint, stop.

`GracefulStop` records the signal (`potstill.signals.StopSignals`, installed with `with stop:` around
`trainer.train()`); at the end of each optimizer step it asks the Trainer to save a checkpoint and stop, and
`run_distill` then raises `stop.stopped(...)`. Under several processes the ranks agree (a max over ranks) so they
stop after the same step, whichever of them got the signal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from potstill.signals import StopSignals


class GracefulStop(StopSignals, TrainerCallback):
    """`signum` is the signal received (0: none); a Trainer callback that stops after the step it came in."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and dist.is_initialized():  # every rank must stop after the same step
            flag = torch.tensor([self.signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item())
        if self.signum:
            control.should_save = True
            control.should_training_stop = True
        return control
