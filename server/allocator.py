"""The memory allocator of the server's processes: tcmalloc, preloaded when the system has it.

vLLM on CPU asks for tcmalloc in ``LD_PRELOAD`` (its CPU worker warns without it; the Docker
image sets it). Guidance makes several ``[rows, vocabulary]`` float32 tensors per decoding step.
With glibc's malloc a block that large is a fresh ``mmap`` whose pages fault in on first write,
every step; tcmalloc reuses freed memory. Through the server on SmolLM2 at concurrency 32 guided
throughput rose 9-16% and unguided did not change (bench/results/allocator/README.md).

``serve`` restarts itself once with tcmalloc in ``LD_PRELOAD`` when the library is installed and
``LD_PRELOAD`` names no allocator yet; the engine processes vLLM spawns inherit it.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

TCMALLOC = "tcmalloc_minimal"
# Allocators a user may have preloaded already: theirs is kept.
ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")


def preloaded_allocator(environ: Mapping[str, str]) -> str | None:
    """The allocator library ``LD_PRELOAD`` names, None when it names none."""
    for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if os.path.basename(entry).startswith(ALLOCATORS):
            return entry
    return None


def with_preload(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """`environ` with `library` first in ``LD_PRELOAD``."""
    rest = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{library}:{rest}" if rest else library}


def tcmalloc_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with tcmalloc first in ``LD_PRELOAD``; None when ``LD_PRELOAD`` names an allocator
    already or tcmalloc is not installed."""
    if preloaded_allocator(environ) is not None:
        return None
    library = ctypes.util.find_library(TCMALLOC)  # e.g. libtcmalloc_minimal.so.4 (Debian: libtcmalloc-minimal4)
    return None if library is None else with_preload(environ, library)


def restart_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded; returns (doing nothing) when
    an allocator is preloaded already or tcmalloc is not installed."""
    if (environ := tcmalloc_environ(os.environ)) is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def log_allocator(environ: Mapping[str, str]) -> None:
    """Say which allocator the server runs with, and how to get tcmalloc when it is glibc's."""
    if (library := preloaded_allocator(environ)) is not None:
        logger.info("memory allocator: %s (LD_PRELOAD)", library)
    else:
        logger.warning("memory allocator: glibc malloc; guided steps run up to 2x slower than with tcmalloc "
                       "(install it, e.g. apt-get install libtcmalloc-minimal4, and alignserve preloads it)")
