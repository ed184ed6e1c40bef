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
    server = start_server(tmp_path / "server.log", "--drain-timeout-s", "300", "--max-n", "64")
    yield server
    stop_server(server)


def envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_sigterm_drains_in_flight_requests_then_exits_0(server_to_stop):
    results: list = []
    # One request of 64 choices x 240 guided tokens: its engine requests start together and run for many
    # seconds, so the poll below sees them running however busy the machine is.
    body = {"model": "demo-base", "prompt": "1+1=", "max_tokens": 240, "ignore_eos": True, "n": 64, "cache": False,
            "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}

    def long_request() -> None:
        with httpx.Client(base_url=server_to_stop.base_url, timeout=300) as http:
            results.append(http.post("/v1/completions", json=body))

    thread = threading.Thread(target=long_request)
    thread.start()
    assert server_to_stop.wait_unfinished(lambda count: count > 0) > 0
    os.kill(server_to_stop.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    with httpx.Client(base_url=server_to_stop.base_url, timeout=30) as http:
        assert http.get("/ready").status_code == 503
        refused = http.post("/v1/completions", json={"model": "demo-base", "prompt": "1"})
        assert envelope(refused, 503)["code"] == "draining"
    thread.join(timeout=300)
    assert [r.status_code for r in results] == [200]
    assert results[0].json()["usage"]["completion_tokens"] == 64 * 240
    assert server_to_stop.process.wait(timeout=60) == 0
    assert "draining 1 in-flight requests" in server_to_stop.log()  # it was still running at SIGTERM
