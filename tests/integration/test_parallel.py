"""Guidance under vLLM's tensor parallelism: the demo model served with tensor_parallel_size=2 (two CPU
workers, each sampling with its own guide models) gives, token for token, what one worker gives, and the
same KL report. The cases, the requests and the servers are those of `bench.tensor_parallel`."""

from __future__ import annotations

import pytest

from bench.tensor_parallel import DEMO_PROMPTS, Guides, Output, cases, prompt_records, serve_and_send
from models.demo.build import demo_base_dir

pytestmark = pytest.mark.engine

CASES = cases(Guides())
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def by_tp(tmp_path_factory) -> dict[int, dict[tuple[str, str], Output]]:
    return {tp: serve_and_send(tp, demo_base_dir(), (), prompt_records(DEMO_PROMPTS), CASES, MAX_TOKENS,
                               tmp_path_factory.mktemp(f"tp{tp}") / "server.log").outputs
            for tp in (1, 2)}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_tensor_parallel_guidance_equals_one_worker(by_tp, name):
    for prompt in DEMO_PROMPTS:
        one, two = by_tp[1][name, prompt], by_tp[2][name, prompt]
        assert two.tokens == one.tokens, (prompt, one.text, two.text)
        assert len(one.tokens) == MAX_TOKENS
        assert one.steps == two.steps == MAX_TOKENS
        assert two.kl == pytest.approx(one.kl, abs=1e-4)
        assert one.kl > 0
        if one.candidate_scores is not None:
            assert two.candidate_scores == pytest.approx(one.candidate_scores, abs=1e-4)
