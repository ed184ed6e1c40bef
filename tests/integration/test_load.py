"""Load and disconnect behaviour on the default server (bounded in count and time)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import assert_stopped_early

pytestmark = pytest.mark.engine


def test_256_concurrent_streams_all_complete(server, model_name):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        body = {"model": model_name, "prompt": f"{i}+{i}=", "max_tokens": 16, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens, done = 0, False
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
        return tokens, done

    async def run():
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=240, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(256))), timeout=300)

    results = asyncio.run(run())
    assert results == [(16, True)] * 256


def test_100_clients_disconnecting_mid_stream_leave_nothing_running(server, model_name):
    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        # Guided steps are slower: the engine cannot finish before the server has seen every client leave.
        body = {"model": model_name, "prompt": f"{i}-1=", "max_tokens": 400, "ignore_eos": True, "stream": True,
                "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # closing the stream disconnects

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(100)))

    assert server.wait_unfinished(lambda count: count == 0) == 0
    tokens_before = server.generated_tokens()
    asyncio.run(run())
    assert_stopped_early(server, tokens_before, 100 * 400)


def test_metrics_expose_vllm_and_alignserve_families(http, model_name):
    http.post("/v1/completions", json={"model": model_name, "prompt": "1+2=", "max_tokens": 4})
    http.post("/v1/completions", json={"model": model_name, "prompt": "1+2=", "max_tokens": 4, "temperature": 3})
    text = http.get("/metrics").text
    for family in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
                   "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                   "alignserve_requests_total", "alignserve_cache_requests_total",
                   "alignserve_draining"):
        assert f"\n{family}" in text or text.startswith(family), family
    assert 'alignserve_requests_total{endpoint="completions",outcome="success"}' in text
    assert 'alignserve_requests_total{endpoint="completions",outcome="invalid"}' in text
    assert "request_id" not in text


def test_memory_cache_hit_and_miss(http, model_name):
    body = {"model": model_name, "prompt": "444+555=", "max_tokens": 6, "seed": 42}

    def count(outcome: str) -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("alignserve_cache_requests_total") and 'backend="memory"' in line \
                    and f'outcome="{outcome}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    hits, misses = count("hit"), count("miss")
    first = http.post("/v1/completions", json=body).json()
    second = http.post("/v1/completions", json=body).json()
    assert (count("miss"), count("hit")) == (misses + 1, hits + 1)
    assert second["choices"] == first["choices"] and second["usage"] == first["usage"]
    third = http.post("/v1/completions", json={**body, "seed": 43}).json()
    assert count("miss") == misses + 2
    assert third["id"] != second["id"]
