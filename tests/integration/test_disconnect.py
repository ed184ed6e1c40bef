"""A client that goes away aborts its engine request, streaming or not."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import post_and_leave_once_running

pytestmark = pytest.mark.engine

# Long enough that the request still runs when the client leaves: 8 choices x 500 tokens, each step
# guided by the demo value model (slower steps), so about a second even on a fast machine.
LONG = {"prompt": "1+1=", "max_tokens": 500, "temperature": 1.0, "ignore_eos": True, "n": 8,
        "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}


def wait_for_unfinished(server, predicate, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    count = server.unfinished_requests()
    while not predicate(count) and time.monotonic() < deadline:
        time.sleep(0.05)
        count = server.unfinished_requests()
    return count


def test_streaming_disconnect_aborts_engine_request(server, model_name):
    assert wait_for_unfinished(server, lambda c: c == 0, 30) == 0
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={"model": model_name, "stream": True, **LONG}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    # The connection is closed here, seconds before 8 choices x 500 tokens could be done.
    assert wait_for_unfinished(server, lambda c: c == 0, 2.0) == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_disconnect_aborts_engine_request(server, model_name, path):
    assert wait_for_unfinished(server, lambda c: c == 0, 30) == 0
    body = {"model": model_name, **LONG}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    # Leave as soon as the engine runs the request: waiting to see all 8 choices running let a fresh
    # clone's CI run see the whole request answered first.
    assert (outcome := post_and_leave_once_running(server, path, body, running=1)) is None, outcome
    assert wait_for_unfinished(server, lambda c: c == 0, 2.0) == 0
