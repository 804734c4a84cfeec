"""What the launcher (torchrun / accelerate launch) told this process: its rank and the number of processes.

Read from the environment, so it is known before any process group exists (a plan, a data split, the sampler's
draw count). Alone, a process is rank 0 of 1.
"""

from __future__ import annotations

import os

from potstill.errors import UserError


def world_size() -> int:
    """Number of processes of the run (`WORLD_SIZE`, 1 when not launched by torchrun / accelerate)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's global rank (`RANK`, 0 when alone)."""
    return int(os.environ.get("RANK", "0"))


# accelerate's environment variables for the engines that shard the model, by the config key that sets them
_SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def check_engine(gpus: bool) -> None:
    """Refuse an FSDP or DeepSpeed launch on a machine without GPUs.

    accelerate (1.x) runs both only on GPU-like devices; on CPUs it quietly trains as plain DDP over gloo (every
    rank a full copy), which is not what the user asked for.

    Args:
        gpus: whether this process sees a GPU.

    Raises:
        UserError: `accelerate launch` with an FSDP or DeepSpeed config and no GPU.
    """
    for variable, engine in _SHARDED.items():
        if os.environ.get(variable, "false").lower() == "true" and not gpus:
            raise UserError(
                f"accelerate config: distributed_type {engine.upper()}: accelerate runs {engine} only on GPUs and this"
                " machine has none (it would train as plain DDP over gloo); on CPUs launch with"
                " potstill/configs/accelerate/ddp.yaml or torchrun"
            )
