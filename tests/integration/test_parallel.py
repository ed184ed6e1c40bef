"""Guidance under vLLM's tensor parallelism: the demo model served with tensor_parallel_size=2 (two CPU
workers, each sampling with its own guide models) gives, token for token, what one worker gives, and the
same KL report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

PROMPTS = ("234+567=", "81+19=")
GUIDED = {
    "qsharp": {"guidance": [{"type": "qsharp", "model": "demo-value", "strength": 4.0}]},
    "cd": {"guidance": [{"type": "cd", "model": "demo-prefix", "strength": 3.0, "top_k": 8}]},
    "arm": {"guidance": [{"type": "arm", "model": "demo-arm", "strength": 2.0}]},
    "genarm": {"guidance": [{"type": "genarm", "model": "demo-genarm", "strength": 1.0}]},
    # Seeded sampling of the candidates: every rank draws the same numbers.
    "best-of-n": {"guidance": [{"type": "qsharp", "model": "demo-value", "strength": 4.0}],
                  "search": {"type": "best_of_n", "n": 3, "scorer": "demo-reward"}, "temperature": 1.0, "seed": 2},
}
# Two CPU workers need one core each; without a binding vLLM refuses ("Not enough allowed NUMA nodes
# to bind threads of 2 local CPUWorkers").
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def outputs(server) -> dict[tuple[str, str], dict]:
    """Each case's completion (tokens, their logprobs, guidance report) on each prompt."""
    results = {}
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for name, fields in GUIDED.items():
            for prompt in PROMPTS:
                body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "cache": False,
                        "ignore_eos": True, "logprobs": 1, **fields}
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                results[name, prompt] = response.json()["choices"][0]
    return results


def served(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> dict[tuple[str, str], dict]:
    # float32 (vLLM on CPU runs "auto" float32 checkpoints in bfloat16) so that the split matmuls of
    # two workers differ from one worker's only by float32 rounding.
    server = start_server(tmp_path / "server.log", "--dtype", "float32", *flags, env=env)
    try:
        return outputs(server)
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def by_tp(tmp_path_factory) -> Iterator[dict[int, dict]]:
    yield {
        1: served(tmp_path_factory.mktemp("tp1")),
        2: served(tmp_path_factory.mktemp("tp2"), "--tensor-parallel-size", "2", env=TP2_ENV),
    }


@pytest.mark.parametrize("name", GUIDED)
def test_tensor_parallel_guidance_equals_one_worker(by_tp, name):
    for prompt in PROMPTS:
        one, two = by_tp[1][name, prompt], by_tp[2][name, prompt]
        assert two["logprobs"]["tokens"] == one["logprobs"]["tokens"], (prompt, one["text"], two["text"])
        assert len(one["logprobs"]["tokens"]) == 6
        assert one["guidance"]["steps"] == two["guidance"]["steps"] == 6
        assert two["guidance"]["kl"] == pytest.approx(one["guidance"]["kl"], abs=1e-4)
        assert one["guidance"]["kl"] > 0
        if "candidate_scores" in one["guidance"]:
            assert two["guidance"]["candidate_scores"] == pytest.approx(one["guidance"]["candidate_scores"],
                                                                        abs=1e-4)
