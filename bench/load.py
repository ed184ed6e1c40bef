"""A closed-loop load generator for an OpenAI-compatible completions endpoint.

`concurrency` clients each send their next request as soon as the last one finished, until
every prompt has been sent (the way `vllm bench serve --max-concurrency` loads a server).
Streamed requests are timed per chunk: time to first token (TTFT) is from sending to the first
chunk with text, inter-token latency (ITL) the gap between successive chunks (one token per
chunk from vLLM and from alignserve; a chunk holding k tokens counts its gap once, as vLLM's
load generator does), output tokens are the server's `usage.completion_tokens`. A request
counts as failed when it errors or generates a token count other than `max_tokens` (every
load sends `ignore_eos`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestTiming:
    latency_s: float
    output_tokens: int
    ttft_s: float | None = None  # streamed requests only
    gaps_s: list[float] = field(default_factory=list)  # streamed requests only


@dataclass(frozen=True)
class LoadResult:
    """One load: `requests` sent at `concurrency`, measured over `seconds` of wall time."""

    concurrency: int
    requests: int
    failed: int
    output_tokens: int
    seconds: float
    ttft_ms: dict[str, float]  # "p50", "p99"; empty for non-streamed loads
    itl_ms: dict[str, float]
    latency_ms: dict[str, float]
    generated_tokens: int  # all tokens the engine generated (best-of-N: every candidate's)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.failed) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "failed": self.failed,
                "output_tokens": self.output_tokens, "generated_tokens": self.generated_tokens,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 2),
                "requests_per_s": round(self.requests_per_s, 3), "ttft_ms": self.ttft_ms,
                "itl_ms": self.itl_ms, "latency_ms": self.latency_ms}


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds (linear interpolation between order statistics); {} when empty."""
    if not values_s:
        return {}
    if len(values_s) == 1:
        return {"p50": round(values_s[0] * 1e3, 2), "p99": round(values_s[0] * 1e3, 2)}
    cuts = statistics.quantiles(values_s, n=100, method="inclusive")
    return {"p50": round(cuts[49] * 1e3, 2), "p99": round(cuts[98] * 1e3, 2)}


async def _streamed(client: httpx.AsyncClient, body: dict) -> RequestTiming:
    began = time.perf_counter()
    last = None
    timing = RequestTiming(latency_s=0.0, output_tokens=0)
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    timing.ttft_s = now - began
                else:
                    timing.gaps_s.append(now - last)
                last = now
            if chunk.get("usage"):
                timing.output_tokens = chunk["usage"]["completion_tokens"]
    timing.latency_s = time.perf_counter() - began
    return timing


async def _whole(client: httpx.AsyncClient, body: dict) -> tuple[RequestTiming, int]:
    began = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    payload = response.json()
    timing = RequestTiming(latency_s=time.perf_counter() - began, output_tokens=payload["usage"]["completion_tokens"])
    reports = [(c.get("guidance") or {}).get("generated_tokens") for c in payload["choices"]]
    generated = sum(r for r in reports if r is not None) if any(r is not None for r in reports) else timing.output_tokens
    return timing, generated


async def run_load(url: str, model: str, prompts: Sequence[str], concurrency: int, max_tokens: int,
                   extra: dict | None = None, stream: bool = True, timeout_s: float = 1800.0) -> LoadResult:
    """Send every prompt (completions, `max_tokens` tokens, `ignore_eos`, temperature 1, seeded by
    its index) from `concurrency` closed-loop clients; `extra` is merged into each body."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    timings: list[RequestTiming] = []
    generated = 0
    failed = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal generated, failed
        while not queue.empty():
            index, prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                    "seed": index, "ignore_eos": True, **(extra or {})}
            try:
                if stream:
                    timing = await _streamed(client, body)
                    engine_tokens = timing.output_tokens
                else:
                    timing, engine_tokens = await _whole(client, body)
            except (httpx.HTTPError, KeyError, ValueError):
                failed += 1
                continue
            if timing.output_tokens != max_tokens:
                failed += 1
                continue
            timings.append(timing)
            generated += engine_tokens

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return LoadResult(
        concurrency=concurrency, requests=len(prompts), failed=failed,
        output_tokens=sum(t.output_tokens for t in timings), seconds=seconds,
        ttft_ms=percentiles_ms([t.ttft_s for t in timings if t.ttft_s is not None]),
        itl_ms=percentiles_ms([g for t in timings for g in t.gaps_s]),
        latency_ms=percentiles_ms([t.latency_s for t in timings]),
        generated_tokens=generated)


def load(url: str, model: str, prompts: Sequence[str], concurrency: int, max_tokens: int,
         extra: dict | None = None, stream: bool = True) -> LoadResult:
    """`run_load` from synchronous code."""
    return asyncio.run(run_load(url, model, prompts, concurrency, max_tokens, extra, stream))
