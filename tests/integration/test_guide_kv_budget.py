"""--guide-kv-cache-space-gib: a guided request is admitted only while the guide model's KV blocks
it may fill are free; otherwise 429 before the engine sees it (own server, a budget of 8 blocks)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

# The demo guide models in float32 hold 64 KiB per block of 16 tokens (4 layers x 2 x 2 KV heads x 16 x 64 x
# 4 bytes): 8 blocks are 512 KiB.
BUDGET_GIB = 8 * 65536 / 2**30
GUIDED = [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("budget") / "server.log",
                          "--guide-kv-cache-space-gib", repr(BUDGET_GIB), "--guide-dtype", "float32")
    yield server
    stop_server(server)


PROMPT = "12+34="


def body(max_tokens: int, **extra) -> dict:
    return {"model": "demo-base", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 1.0, "cache": False, **extra}


def prompt_tokens(http: httpx.Client) -> int:
    return http.post("/tokenize", json={"model": "demo-base", "prompt": PROMPT}).json()["count"]


def test_the_budget_is_exposed(budgeted):
    assert budgeted.metric("alignserve_guide_kv_blocks", model="demo-value") == 8
    assert budgeted.metric("alignserve_guide_kv_blocks_held", model="demo-value") == 0
    assert "guide model demo-value: KV cache 8 blocks of 16 tokens, 0.00 GiB (--guide-kv-cache-space-gib)" \
        in budgeted.log()


def test_guided_requests_wait_with_429_while_the_blocks_are_held(budgeted):
    """Requests that arrive together: each guided one may fill 7 of the 8 blocks, so while one runs
    the others are refused; a one-block request, unguided requests and another guide model fit."""
    rejected = budgeted.metric("alignserve_guide_kv_rejected_total", model="demo-value")
    with httpx.Client(base_url=budgeted.base_url, timeout=120) as http:
        seven_blocks, one_block = 7 * 16 - prompt_tokens(http), 16 - prompt_tokens(http)
    other = [{"type": "qsharp", "model": "demo-value-hist", "strength": 1.0, "top_k": 4}]
    bodies = [body(seven_blocks, guidance=GUIDED) for _ in range(4)] + [
        body(one_block, guidance=GUIDED), body(seven_blocks), body(seven_blocks, guidance=other)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=budgeted.base_url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(run())  # the 4 arrive within milliseconds; each runs for 100 guided steps
    big = [r.status_code for r in responses[:4]]
    assert 200 in big and 429 in big, big
    assert [r.status_code for r in responses[4:]] == [200, 200, 200], [r.text for r in responses[4:]]
    refused = next(r for r in responses[:4] if r.status_code == 429)
    assert refused.headers["retry-after"] and "guide model 'demo-value' is full" in refused.text
    assert all(r.json()["choices"][0]["guidance"]["steps"] == seven_blocks for r in responses[:4]
               if r.status_code == 200)
    assert budgeted.metric("alignserve_guide_kv_rejected_total", model="demo-value") == rejected + big.count(429)
    assert budgeted.metric("alignserve_guide_kv_blocks_held", model="demo-value") == 0  # all answered: all freed
    with httpx.Client(base_url=budgeted.base_url, timeout=120) as http:
        assert http.post("/v1/completions", json=body(seven_blocks, guidance=GUIDED)).status_code == 200


def test_a_request_over_the_whole_budget_is_400(budgeted):
    with httpx.Client(base_url=budgeted.base_url, timeout=120) as http:
        # 2 choices x 5 blocks, over the 8 of the budget: it could never be admitted.
        response = http.post("/v1/completions", json=body(5 * 16 - prompt_tokens(http), n=2, guidance=GUIDED))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"
