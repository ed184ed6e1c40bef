"""Checks that may hold the GIL for ever, run in worker processes that can be killed.

A catastrophic regular expression, a power tower in sympy or a JSON schema's ``pattern`` runs
inside one C call that keeps the GIL: in the server's process no other thread (the event loop
included) would run until it returned, and no Python-level timeout can stop it. So these checks
run in worker processes (``main``, in a fresh interpreter): a worker imports MODULE
once, then answers calls ``MODULE.function(*args)``, one JSON line each way over its stdin and
stdout. A call that outlives its time limit kills its worker (SIGKILL); the next call starts a
fresh one. Workers start on demand, one per concurrent caller, are reused, have their address
space capped (WORKER_MEMORY_BYTES), and die with the thread that started them (Linux
PR_SET_PDEATHSIG) or when their stdin closes.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

WORKER_MEMORY_BYTES = 2 << 30
START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1
_CHILD = f"import sys; from {__name__} import main; main(sys.argv[1])"


class WorkerCallError(RuntimeError):
    """The called function raised in the worker (the worker lives on)."""


class WorkerTimeout(TimeoutError):
    """The call took longer than its limit; its worker was killed."""


class WorkerDied(RuntimeError):
    """The worker exited mid-call (out of memory, killed)."""


class _Worker:
    def __init__(self, module: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _CHILD, module], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, bufsize=0)
        self._pending = b""
        try:
            self._receive(START_TIMEOUT_S)  # {"ready": true} once MODULE is imported
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def call(self, function: str, args: tuple[Any, ...], timeout_s: float) -> Any:
        try:
            self.process.stdin.write(json.dumps([function, list(args)]).encode() + b"\n")
        except BrokenPipeError as exc:
            raise WorkerDied("the worker process exited") from exc
        reply = self._receive(timeout_s)
        if "error" in reply:
            raise WorkerCallError(reply["error"])
        return reply["ok"]

    def _receive(self, timeout_s: float) -> dict[str, Any]:
        """The next reply line, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerTimeout(f"no answer within {timeout_s:g} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise WorkerDied(f"the worker process exited (status {self.process.wait()})")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)


class WorkerPool:
    """Calls into functions of `module`, each in a worker process, each limited in time."""

    def __init__(self, module: str) -> None:
        self.module = module
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
        return _Worker(self.module)

    def call(self, function: str, *args: Any, timeout_s: float) -> Any:
        """``module.function(*args)`` (JSON in, JSON out) in a worker: WorkerCallError when it raised,
        WorkerTimeout when it took over `timeout_s` (the worker is killed), WorkerDied when the worker
        exited."""
        worker = self._take()
        try:
            result = worker.call(function, args, timeout_s)
        except WorkerCallError:
            self._give_back(worker)
            raise
        except BaseException:
            worker.kill()
            raise
        self._give_back(worker)
        return result

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker still ends when its stdin closes
        pass


def main(module_name: str) -> None:
    """The worker's loop: import the module, say ready, answer calls until stdin closes."""
    _die_with_parent()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    memory = WORKER_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything the checks print goes to stderr, not into the replies
    module = importlib.import_module(module_name)

    def reply(body: dict[str, Any]) -> None:
        replies.write(json.dumps(body).encode() + b"\n")

    reply({"ready": True})
    for line in sys.stdin.buffer:
        function, args = json.loads(line)
        try:
            body = {"ok": getattr(module, function)(*args)}
        except Exception as exc:  # MemoryError and RecursionError included: the worker goes on
            body = {"error": f"{type(exc).__name__}: {exc}"}
        reply(body)
