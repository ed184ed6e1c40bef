"""The sandbox's child: limits its own process, then runs ``program.py`` from its working directory.

Started by ``guidance.verifiers.sandbox`` as ``python -I -B sandbox_child.py LIMITS_JSON`` (the
standard library only). It reads one line from stdin, the run's nonce, and writes it to the
original stdout only after program.py has returned normally, so a program that exits early
(``sys.exit(0)``, ``os._exit(0)``) before its tests have run does not pass.

The limits are set here rather than in a ``preexec_fn``: the server starts sandboxes from scorer
threads, and a ``preexec_fn`` is not safe in a process with threads. Nothing of the program runs
before they are in place.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import runpy
import sys
from collections.abc import Callable
from typing import Any

PROGRAM = "program.py"
_CLONE_NEWNET = 0x40000000

# Audit events refused outright: new processes, signals to others, sockets, native code, and raising
# the limits (root could: it may raise hard limits).
REFUSED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "socket.__new__", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "resource.setrlimit", "resource.prlimit",
})
# Audit events that change the file system: (path argument, its dir_fd argument or None) pairs.
PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.symlink": ((1, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "shutil.rmtree": ((0, 1),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def lower_limit(kind: int, value: int) -> None:
    """Set soft and hard limit `kind` to `value`, or to the hard limit already in place if lower."""
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def limit(limits: dict[str, Any]) -> None:
    """Address space, CPU seconds, file size, no new processes (not enforced for root), no core files."""
    for kind, value in ((resource.RLIMIT_AS, limits["memory_bytes"]),
                        (resource.RLIMIT_CPU, math.ceil(limits["time_s"])),
                        (resource.RLIMIT_FSIZE, limits["file_bytes"]),
                        (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        lower_limit(kind, value)


def isolate_network() -> None:
    """Move into a new, empty network namespace (a loopback that is down) where the kernel allows it
    (root or CAP_SYS_ADMIN); elsewhere the socket guard below is all there is."""
    ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET)


def guard(root: str) -> Callable[[str, tuple], None]:
    """An audit hook that refuses REFUSED_EVENTS and file-system changes outside `root`."""
    def inside(path: Any, dir_fd: Any) -> bool:
        if isinstance(path, int):  # an open descriptor
            return True
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
        full = os.path.realpath(os.path.join(base, os.fsdecode(path)))
        return full == os.devnull or full == root or full.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in REFUSED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode is not None else bool(flags & _WRITE_FLAGS)
            if writes and not inside(path, None):
                raise PermissionError(f"sandbox: no writing outside the working directory ({path!r})")
        for path_at, dir_fd_at in PATH_EVENTS.get(event, ()):
            if not inside(args[path_at], None if dir_fd_at is None else args[dir_fd_at]):
                raise PermissionError(f"sandbox: {event} outside the working directory ({args[path_at]!r})")

    return hook


def main() -> None:
    limits = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    result = os.dup(1)  # where the nonce goes, whatever the program does to sys.stdout
    limit(limits)
    isolate_network()
    sys.addaudithook(guard(os.path.realpath(os.getcwd())))
    runpy.run_path(PROGRAM, run_name="__main__")
    sys.stdout.flush()
    os.write(result, f"\n{nonce}\n".encode())


if __name__ == "__main__":
    main()
