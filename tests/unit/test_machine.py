"""Platform detection and the default dtype on every CPU kind, with the CPU's features simulated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from server import machine

# Run in a fresh interpreter: vLLM resolves its platform once per process. The CPU is made to look
# AVX2-only (or AVX-512 without bf16) to PyTorch, whose checks vLLM's CPU platform uses to pick kernels.
PROBE = textwrap.dedent("""
    import json, sys
    import torch
    torch.cpu._is_avx512_supported = lambda: {avx512}
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
    tried = []  # the kernel libraries vLLM imports (an AVX one imports with an ImportError vLLM ignores)
    class KernelSpy:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("vllm._C"):
                tried.append(name)
    sys.meta_path.insert(0, KernelSpy())
    from bench.vllm_cli import install_version_lookup
    install_version_lookup()
    import importlib.metadata
    from vllm.platforms import current_platform
    current_platform.import_kernels()
    from server.machine import resolve_dtype
    print(json.dumps({{"platform": type(current_platform).__name__, "cpu": current_platform.is_cpu(),
                      "version": importlib.metadata.version("vllm"), "dtype": resolve_dtype("auto"),
                      "kernels": tried}}))
""")


@pytest.mark.parametrize(("avx512", "kernels"), [(False, ["vllm._C_AVX2"]), (True, ["vllm._C_AVX512"])])
def test_cli_shim_picks_the_cpu_platform_and_the_cpus_kernels(avx512, kernels):
    run = subprocess.run([sys.executable, "-c", PROBE.format(avx512=avx512)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    # Not vLLM's generic platform, whose kernels (`vllm._C`, built for AVX-512-bf16) die with SIGILL on such a CPU.
    assert seen["platform"] == "CpuPlatform" and seen["cpu"], seen
    assert seen["version"].endswith("+cpu")
    assert seen["kernels"] == kernels
    assert seen["dtype"] == "float32"


def test_auto_dtype_is_float32_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert machine.resolve_dtype("auto") == "float32"
    assert machine.resolve_dtype("bfloat16") == "bfloat16"  # an explicit choice is kept


@pytest.mark.parametrize("flag", ["_is_avx512_bf16_supported", "_is_amx_tile_supported"])
def test_auto_dtype_is_left_to_vllm_with_bf16_instructions(monkeypatch, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flag == "_is_avx512_bf16_supported")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flag == "_is_amx_tile_supported")
    assert machine.resolve_dtype("auto") == "auto"
    assert machine.resolve_dtype("float32") == "float32"


def test_vllm_version_is_the_cpu_builds_with_its_suffix():
    assert machine.vllm_version().endswith("+cpu")


def test_vector_flags_lists_only_simd_and_amx_flags(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f", "amx_bf16", "fpu"}))
    assert machine.vector_flags() == ["amx_bf16", "avx2", "avx512f"]


def test_dtype_speed_bench_times_both_dtypes_and_checks_the_rule():
    from bench.dtype_speed import measure

    result = measure(rows=8, in_features=16, out_features=32, threads=1, rounds=1, repeats=2)
    assert set(result["seconds"]) == {"float32", "bfloat16"} and all(s > 0 for s in result["seconds"].values())
    assert result["faster"] in ("float32", "bfloat16")
    assert result["default_dtype"] == machine.resolve_dtype("auto")
    assert result["machine"]["cpu_flags"] == machine.vector_flags()
