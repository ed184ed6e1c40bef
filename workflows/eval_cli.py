"""`alignserve eval` (being written)."""

from __future__ import annotations

import argparse


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    pass
