"""Which allocator `serve` preloads, and when it leaves LD_PRELOAD alone."""

from __future__ import annotations

import subprocess
import sys

from server.allocator import preloaded_allocator, with_preload


def test_an_allocator_already_preloaded_is_kept():
    assert preloaded_allocator({}) is None
    assert preloaded_allocator({"LD_PRELOAD": "/opt/torch/lib/libgomp.so.1"}) is None
    assert preloaded_allocator({"LD_PRELOAD": "/x/libgomp.so.1:/usr/lib/libjemalloc.so.2"}) == "/usr/lib/libjemalloc.so.2"
    assert preloaded_allocator({"LD_PRELOAD": "libtcmalloc_minimal.so.4 /x/libgomp.so.1"}) == "libtcmalloc_minimal.so.4"


def test_tcmalloc_goes_first_and_other_preloads_stay():
    assert with_preload({"A": "1"}, "libtcmalloc_minimal.so.4") == {"A": "1", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    env = with_preload({"LD_PRELOAD": "/x/libgomp.so.1"}, "libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/x/libgomp.so.1"
    assert preloaded_allocator(env) == "libtcmalloc_minimal.so.4"


def test_a_process_started_with_the_preload_maps_tcmalloc():
    """What `serve` restarts with: the dynamic loader finds the library by its name, as setup.sh installs it."""
    env = with_preload({}, "libtcmalloc_minimal.so.4")
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True)
    assert "libtcmalloc_minimal" in maps.stdout, "tcmalloc is not installed: apt-get install libtcmalloc-minimal4"
