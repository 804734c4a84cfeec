"""`python -m potstill.config [--check]`: regenerate docs/config-reference.md and configs/kd_default.yaml."""

import sys

from potstill.config.reference import main

sys.exit(main())
