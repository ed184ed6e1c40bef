"""SIGTERM drains: in-flight requests finish, new ones get 503, the process exits 0 (own server)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine


@pytest.fixture
def server_to_stop(tmp_path):
    server = start_server(tmp_path / "server.log", "--drain-timeout-s", "60")
    yield server
    stop_server(server)


def envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_sigterm_drains_in_flight_requests_then_exits_0(server_to_stop):
    results: list = []
    body = {"model": "demo-base", "prompt": "1+1=", "max_tokens": 480, "ignore_eos": True, "n": 12, "cache": False}

    def long_request() -> None:
        with httpx.Client(base_url=server_to_stop.base_url, timeout=120, ) as http:
            results.append(http.post("/v1/completions", json=body))

    threads = [threading.Thread(target=long_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server_to_stop.unfinished_requests() < 24 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(server_to_stop.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    with httpx.Client(base_url=server_to_stop.base_url, timeout=30, ) as http:
        assert http.get("/ready").status_code == 503
        refused = http.post("/v1/completions", json={"model": "demo-base", "prompt": "1"})
        assert envelope(refused, 503)["code"] == "draining"
    for thread in threads:
        thread.join(timeout=120)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 12 * 480 for r in results)
    assert server_to_stop.process.wait(timeout=60) == 0
