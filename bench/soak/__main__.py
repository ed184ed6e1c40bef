"""`python -m bench.soak`: bench/soak/cli.py."""

from __future__ import annotations

import sys

from bench.soak.cli import main

sys.exit(main())
