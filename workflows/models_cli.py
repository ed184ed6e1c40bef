"""`alignserve models` (being written)."""

from __future__ import annotations

import argparse


def add_models_command(commands: argparse._SubParsersAction) -> None:
    pass
