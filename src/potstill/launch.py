"""What the launcher (torchrun / accelerate launch) told this process: its rank and the number of processes.

Read from the environment, so it is known before any process group exists (a plan, a data split, the sampler's
draw count). Alone, a process is rank 0 of 1.
"""

from __future__ import annotations

import os


def world_size() -> int:
    """Number of processes of the run (`WORLD_SIZE`, 1 when not launched by torchrun / accelerate)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's global rank (`RANK`, 0 when alone)."""
    return int(os.environ.get("RANK", "0"))
