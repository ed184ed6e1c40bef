"""Running a model's Python with its tests in a child process, under limits.

What a run gets (``run_python``):

- a fresh ``python -I -B`` (no ``PYTHON*`` variables, no user site-packages, no bytecode written)
  in its own session (process group), started without a ``preexec_fn`` (unsafe with threads);
- a throwaway working directory (``tempfile.TemporaryDirectory``) that is also its ``HOME`` and
  ``TMPDIR``, and an environment of those plus ``PATH`` and ``LANG``: nothing of the server's;
- limits it sets on itself before the program runs (``sandbox_child``): address space
  (RLIMIT_AS), CPU seconds (RLIMIT_CPU), the size of any file it writes (RLIMIT_FSIZE), no new
  processes (RLIMIT_NPROC 0) and no core files;
- its own empty network namespace where the kernel allows one (root or CAP_SYS_ADMIN), so no
  network at all;
- an audit hook (PEP 578) refusing, at the Python level, new processes, signals, sockets,
  ctypes, raising its own limits, and writes, renames and deletions outside the working
  directory;
- a wall-clock limit: at ``time_s`` the whole process group is killed (SIGKILL), as it is at
  the end of every run; output (stdout and stderr together) is read up to ``output_bytes``, and
  a run that writes more is killed there.

It passes when the program returns normally (exit status 0 and the run's nonce printed after
it, so an early ``sys.exit(0)`` does not pass); anything else fails.

What it is not: a security boundary. The child runs as the same user as the server and can
read whatever that user can (files, other processes' ``/proc/<pid>/environ``). As root,
RLIMIT_NPROC is not enforced, so only the audit hook stops a fork bomb. Audit hooks stop Python
code only: native code (an extension module, a ``.so`` the program finds) gets past them. Without
the privilege to make a network namespace, sockets are refused only by the hook. Memory is
limited per process, not in total, and CPU only by time. It is meant for code a model wrote
for a task, not for code written to escape; run it in a container or VM of its own for that.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from guidance.verifiers.sandbox_child import PROGRAM

_CHILD = str(Path(__file__).with_name("sandbox_child.py"))


@dataclass(frozen=True)
class SandboxLimits:
    time_s: float = 5.0  # wall clock; RLIMIT_CPU is its ceiling in whole seconds
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    output_bytes: int = 1 << 16  # stdout + stderr read, at most
    file_bytes: int = 1 << 24  # RLIMIT_FSIZE: the largest file it may write


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    outcome: str  # "passed", "failed" (exit status), "killed" (a signal), "timeout", "output_limit"
    output: str  # what it printed, at most output_bytes


def _read(process: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[bytes, str | None]:
    """The output until EOF; with "timeout" or "output_limit" when a limit stopped it."""
    fd = process.stdout.fileno()
    output = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return bytes(output), "timeout"
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(output), None
        output += chunk
        if len(output) > limits.output_bytes:
            return bytes(output[: limits.output_bytes]), "output_limit"


def _outcome(process: subprocess.Popen, output: bytes, nonce: str, deadline: float) -> str:
    try:
        status = process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "timeout"
    if status < 0:
        return "killed"
    return "passed" if status == 0 and nonce.encode() in output else "failed"


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` (Python source) in a sandbox (module docstring); never raises for what the
    program does."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="alignserve-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, PROGRAM).write_text(program)
        environment = {"HOME": workdir, "TMPDIR": workdir, "PATH": os.defpath, "LANG": "C.UTF-8"}
        deadline = time.monotonic() + limits.time_s
        process = subprocess.Popen([sys.executable, "-I", "-B", _CHILD, json.dumps(asdict(limits))], cwd=workdir,
                                   env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                process.stdin.write(f"{nonce}\n".encode())
                process.stdin.close()
            except BrokenPipeError:
                pass  # it is gone already: its status says why
            output, stopped = _read(process, limits, deadline)
            outcome = stopped or _outcome(process, output, nonce, deadline)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the program and anything it left behind
            except ProcessLookupError:
                pass
            process.wait()
            process.stdout.close()
    return SandboxResult(outcome == "passed", outcome, output.decode(errors="replace").replace(nonce, "").rstrip())
