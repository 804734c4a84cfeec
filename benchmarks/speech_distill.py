"""Speech recognition distillation, the whole recipe of docs/speech.md: `potstill speech recipe` with these options.

    python benchmarks/speech_distill.py --out runs/speech --seeds 0,1

The report (OUT/report.md, OUT/report.json) has WER per domain, real-time factor and size of the teacher and of each
KD / CE-only student, each stage's wall and CPU seconds, and the load of the machine before and after.
"""

from __future__ import annotations

import sys

from potstill.cli import main

if __name__ == "__main__":
    main(["speech", "recipe", *sys.argv[1:]])
