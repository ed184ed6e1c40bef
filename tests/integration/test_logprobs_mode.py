"""`--logprobs-mode processed_logprobs` (vLLM's engine argument): the logprobs a guided request returns
are those of the guided distribution it was sampled from, the one its KL report is about; with vLLM's
default (`raw_logprobs`) they are the base model's."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

GUIDANCE = [{"type": "qsharp", "model": "demo-value", "strength": 4.0}]


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> Iterator[httpx.Client]:
    server = start_server(tmp_path_factory.mktemp("logprobs-mode") / "server.log",
                          "--logprobs-mode", "processed_logprobs", "--dtype", "float32")
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            yield client
    finally:
        stop_server(server)


def first_token(http: httpx.Client, prompt: str, **fields) -> dict:
    body = {"model": "demo-base", "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "seed": 3,
            "logprobs": 20, "cache": False, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.parametrize("prompt", ["234+567=", "81+19="])
def test_processed_logprobs_are_the_guided_distribution(http, prompt):
    base = first_token(http, prompt)["logprobs"]["top_logprobs"][0]
    guided = first_token(http, prompt, guidance=GUIDANCE)
    q = guided["logprobs"]["top_logprobs"][0]
    # KL(q || p) over the top 20 tokens, which hold nearly all of q's mass on the demo model: it is the
    # one-step KL the server reports (up to the tail's share); raw logprobs would give q = p and 0.
    common = q.keys() & base.keys()
    assert sum(math.exp(q[t]) for t in common) > 0.999
    kl_from_logprobs = sum(math.exp(q[t]) * (q[t] - base[t]) for t in common)
    reported = guided["guidance"]["kl"]
    assert reported > 0.005
    assert kl_from_logprobs == pytest.approx(reported, rel=0.05)
