"""The demo base model served by vLLM is a real but imperfect policy on its task."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI

from guidance.verifiers import get_verifier
from models.demo.task import sample_problems

pytestmark = pytest.mark.engine


def test_demo_pass_at_1_is_between_20_and_80_percent(server, model_name):
    problems = sample_problems(200, seed=4242)
    verifier = get_verifier("demo-verifier")

    async def run() -> list[float]:
        async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:

            async def solve(i: int, prompt: str) -> float:
                result = await client.completions.create(
                    model=model_name, prompt=prompt, temperature=1.0, max_tokens=8, seed=i
                )
                return verifier(prompt, result.choices[0].text)

            return await asyncio.gather(*(solve(i, p.prompt) for i, p in enumerate(problems)))

    rewards = asyncio.run(run())
    pass_at_1 = sum(rewards) / len(rewards)
    assert 0.2 <= pass_at_1 <= 0.8, pass_at_1


def _pass_at_1(server, model_name: str, prompts: list[str], guidance: list[dict] | None, samples: int) -> float:
    verifier = get_verifier("demo-verifier")
    extra = {"guidance": guidance} if guidance else {}

    async def run() -> list[float]:
        async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                               timeout=300) as client:

            async def solve(i: int, prompt: str) -> list[float]:
                result = await client.completions.create(
                    model=model_name, prompt=prompt, temperature=1.0, max_tokens=8, seed=samples * i, n=samples,
                    extra_body=extra)
                return [verifier(prompt, choice.text) for choice in result.choices]

            return await asyncio.gather(*(solve(i, p) for i, p in enumerate(prompts)))

    rewards = [r for rs in asyncio.run(run()) for r in rs]
    return sum(rewards) / len(rewards)


def test_demo_value_guidance_raises_pass_at_1(server, model_name):
    """The committed demo value model steers the base toward right answers (same prompts, same seeds)."""
    prompts = [p.prompt for p in sample_problems(150, seed=9191)]
    base = _pass_at_1(server, model_name, prompts, None, samples=2)
    guided = _pass_at_1(server, model_name, prompts,
                        [{"type": "qsharp", "model": "demo-value", "strength": 4.0}], samples=2)
    assert guided > base + 0.03, (base, guided)
