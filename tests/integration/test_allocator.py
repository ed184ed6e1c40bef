"""`alignserve serve` runs with tcmalloc preloaded: its own process and the engine processes vLLM spawns."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        children = _children(queue.pop())
        found += children
        queue += children
    return found


def test_server_and_engine_processes_map_tcmalloc(server):
    processes = [server.process.pid, *_descendants(server.process.pid)]
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in processes}
    assert any(name.startswith("VLLM::Engine") for name in names.values()), names  # the engine core process
    for pid in processes:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtcmalloc" in maps, f"{names[pid]} (pid {pid}) runs without tcmalloc{server.log_tail()}"
    assert "memory allocator: libtcmalloc" in server.log()
