"""SIGTERM drains: in-flight requests finish, new ones get 503, the process exits 0 (own server)."""

from __future__ import annotations

import json
import os
import signal
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
    # A streamed request of 64 choices x 240 tokens with 20 top logprobs a token: some 15 MB of events, far more
    # than the sockets between server and test buffer, so it cannot be answered whole before the test reads it.
    # It is in flight when SIGTERM comes however fast the machine (a request that had ended would let the drain
    # end at once), and the drain must wait for it.
    body = {"model": "demo-base", "prompt": "1+1=", "max_tokens": 240, "ignore_eos": True, "n": 64, "cache": False,
            "logprobs": 20, "stream": True, "stream_options": {"include_usage": True},
            "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}
    with httpx.Client(base_url=server_to_stop.base_url, timeout=300) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
        first = json.loads(next(events))
        os.kill(server_to_stop.process.pid, signal.SIGTERM)
        time.sleep(0.2)
        try:
            with httpx.Client(base_url=server_to_stop.base_url, timeout=30) as probe:
                assert probe.get("/ready").status_code == 503
                refused = probe.post("/v1/completions", json={"model": "demo-base", "prompt": "1"})
                assert envelope(refused, 503)["code"] == "draining"
        except httpx.TransportError as exc:
            pytest.fail(f"the server stopped listening while a request was in flight ({exc!r}; exit code "
                        f"{server_to_stop.process.poll()}){server_to_stop.log_tail()}")
        rest = list(events)
    assert rest[-1] == "[DONE]", server_to_stop.log_tail()
    chunks = [first, *map(json.loads, rest[:-1])]
    assert chunks[-1]["usage"]["completion_tokens"] == 64 * 240
    finished = [choice for chunk in chunks for choice in chunk["choices"] if choice.get("finish_reason")]
    assert sorted(choice["index"] for choice in finished) == list(range(64))
    assert server_to_stop.process.wait(timeout=60) == 0
    assert "draining 1 in-flight requests" in server_to_stop.log()
