"""A client that goes away aborts its engine request, streaming or not."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import assert_stopped_early, post_and_leave

pytestmark = pytest.mark.engine

# Long enough that the request still runs when the client leaves (after a second), however busy the machine:
# 16 choices x 500 tokens, each step guided by the demo value model (slower steps), so about 6 s on a fast machine.
LONG = {"prompt": "1+1=", "max_tokens": 500, "temperature": 1.0, "ignore_eos": True, "n": 16,
        "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}
FULL_TOKENS = 16 * 500


def test_streaming_disconnect_aborts_engine_request(server, model_name):
    assert server.wait_unfinished(lambda count: count == 0) == 0
    tokens_before = server.generated_tokens()
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"model": model_name, "stream": True, **LONG}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    assert_stopped_early(server, tokens_before, FULL_TOKENS)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_disconnect_aborts_engine_request(server, model_name, path):
    assert server.wait_unfinished(lambda count: count == 0) == 0
    tokens_before = server.generated_tokens()
    body = {"model": model_name, **LONG}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    aborted_before = server.metric("alignserve_requests_total", outcome="aborted")
    assert (outcome := post_and_leave(server, path, body)) is None, outcome
    assert_stopped_early(server, tokens_before, FULL_TOKENS)
    assert server.metric("alignserve_requests_total", outcome="aborted") == aborted_before + 1
