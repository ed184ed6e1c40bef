"""Faults the soak (python -m bench.soak) injects into a server, loaded by its interpreters at start-up.

The soak puts this directory on the server's PYTHONPATH only; Python then imports this module
in the server and in every process vLLM spawns. ``ALIGNSERVE_FAULTS`` (comma-separated) turns
faults on; without it the module does nothing and imports nothing.

- ``stall-scorer``: a verifier ``fault-stall`` that scores 0.0, but first sleeps for an hour,
  far past any scorer timeout, when the prompt holds the marker ``STALL`` (a hung scorer).
"""

from __future__ import annotations

import os

FAULTS_ENV = "ALIGNSERVE_FAULTS"
STALL_SCORER = "stall-scorer"
STALL_VERIFIER = "fault-stall"
STALL_MARKER = "STALL"
STALL_S = 3600.0


def _stalling_verifier(prompt: str, completion: str) -> float:
    """0.0, after sleeping `STALL_S` seconds when `prompt` holds `STALL_MARKER`."""
    if STALL_MARKER in prompt:
        import time

        time.sleep(STALL_S)
    return 0.0


if STALL_SCORER in os.environ.get(FAULTS_ENV, "").split(","):
    from guidance.verifiers import register_verifier

    register_verifier(STALL_VERIFIER, _stalling_verifier)
