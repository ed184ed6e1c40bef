"""A server run as a child process: started on a free port, awaited on ``/health``, stopped.

    with start_server("alignserve", lambda port: alignserve_command(model, port), log_path) as server:
        httpx.post(f"{server.url}/v1/completions", json=...)

The child runs in its own process group, so stopping it (SIGTERM, then SIGKILL after a
timeout) also ends the engine's worker processes. Its stdout and stderr go to a log file,
whose tail is quoted when it fails to start. Used by ``alignserve eval --model`` and by the
benchmarks (``bench/servers.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

LOG_TAIL_LINES = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alignserve_command(model: Path, port: int, flags: Sequence[str] = ()) -> list[str]:
    """``alignserve serve --model MODEL --port PORT *flags`` with this interpreter's console script."""
    return [str(Path(sys.executable).parent / "alignserve"), "serve", "--model", str(model), "--port", str(port),
            *flags]


def stop_process(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the process group of ``process`` (the server drains), SIGKILL it after ``timeout_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class ServerProcess:
    """A started server: its process, base URL, log file and seconds it took to become healthy."""

    name: str
    process: subprocess.Popen
    url: str
    log_path: Path
    start_seconds: float

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines)


def start_server(name: str, command: Callable[[int], Sequence[str]], log_path: Path,
                 env: Mapping[str, str] | None = None, timeout_s: float = 600.0) -> ServerProcess:
    """Run ``command(port)`` on a free port and return once ``GET /health`` answers 200.

    RuntimeError (quoting the end of the log) when the process exits first or is not healthy
    within ``timeout_s``; the process is stopped then.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(list(command(port)), stdout=log, stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env}, start_new_session=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was healthy; "
                               f"end of {log_path}:\n{_log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return ServerProcess(name, process, url, log_path, time.perf_counter() - began)
        except httpx.TransportError:
            pass
        if time.perf_counter() - began > timeout_s:
            stop_process(process)
            raise RuntimeError(f"{name} was not healthy within {timeout_s:g} s; end of {log_path}:\n"
                               f"{_log_tail(log_path)}")
        time.sleep(0.5)
