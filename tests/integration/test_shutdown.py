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
            try:
                results.append(http.post("/v1/completions", json=body))
            except httpx.TransportError as exc:
                results.append(exc)

    thread = threading.Thread(target=long_request)
    thread.start()
    assert server_to_stop.wait_unfinished(lambda count: count > 0) > 0
    # The request must still be open when the signal comes: were it already answered (an error), the drain would
    # end at once and the server stop listening, which is right and not what this test is about.
    assert thread.is_alive(), f"the request ended before SIGTERM: {describe(results)}{server_to_stop.log_tail()}"
    os.kill(server_to_stop.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    try:
        with httpx.Client(base_url=server_to_stop.base_url, timeout=30) as http:
            assert http.get("/ready").status_code == 503
            refused = http.post("/v1/completions", json={"model": "demo-base", "prompt": "1"})
            assert envelope(refused, 503)["code"] == "draining"
    except httpx.TransportError as exc:
        thread.join(timeout=60)
        pytest.fail(f"the server stopped listening while draining ({exc!r}; exit code "
                    f"{server_to_stop.process.poll()}; the in-flight request: {describe(results)})"
                    f"{server_to_stop.log_tail()}")
    thread.join(timeout=300)
    statuses = [getattr(r, "status_code", None) for r in results]
    assert statuses == [200], f"{describe(results)}{server_to_stop.log_tail()}"
    assert results[0].json()["usage"]["completion_tokens"] == 64 * 240
    assert server_to_stop.process.wait(timeout=60) == 0
    assert "draining 1 in-flight requests" in server_to_stop.log()  # it was still running at SIGTERM


def describe(results: list) -> str:
    """What the long request got: its status and the start of its body, or its transport error."""
    return "; ".join(f"{r.status_code} {r.text[:300]}" if isinstance(r, httpx.Response) else repr(r)
                     for r in results) or "no answer yet"
