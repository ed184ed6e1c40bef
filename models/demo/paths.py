"""Where the committed demo checkpoints live."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
GUIDES_FILE = "guides.json"  # {guide model name: directory relative to this file}


def demo_guides_file() -> Path:
    """The demo's guide-model table, as served by default next to the demo base model."""
    return CHECKPOINTS_DIR / GUIDES_FILE
