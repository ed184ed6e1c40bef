"""Generation failures at the edge: an engine error mid-stream, a scorer too short for the request."""

from __future__ import annotations

import asyncio
import json

import pytest

from guidance.search.scorers import Scorer, ScorerCatalog
from guidance.search.spec import BestOfN
from server.api.completions.protocol import CompletionRequest
from server.api.completions.serving import CompletionServing
from server.api.generation import Prepared, PreparedPrompt
from server.api.streaming import SSE_DONE
from server.engine import ChoiceDelta, SamplingOptions
from server.errors import InvalidRequest
from server.services import Services
from server.tracking import RequestTracker


class FailingEngine:
    """Sends one token, then fails as a dead engine core would."""

    def generate(self, request_id, prompt_ids, options):
        async def choices():
            yield ChoiceDelta(index=0, text="1", token_ids=(5,), logprobs=None, finish_reason=None)
            raise RuntimeError("engine core died")

        return choices()


class ShortScorer(Scorer):
    name, kind, max_length = "short", "model", 10

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        return [0.0] * len(completions)


def services(**fields) -> Services:
    defaults = dict(settings=None, engine=None, renderer=None, catalog=None, scorers=ScorerCatalog([]), search=None,
                    lifecycle=None, cache=None, tools=None, created=0, tracker=None)
    return Services(**{**defaults, **fields})


def test_an_engine_error_mid_stream_ends_it_with_an_error_event_and_done():
    serving = CompletionServing(services(engine=FailingEngine()))
    body = CompletionRequest(model="m", prompt="1+1=", stream=True)
    prepared = Prepared([PreparedPrompt([1, 2], "1+1=", SamplingOptions(max_tokens=4))])

    async def run():
        record = RequestTracker(stall_timeout_s=60).open("cmpl-1", "text_completion", True, timeout_s=60)
        return [event async for event in serving.stream(body, prepared, None, record)]

    events = asyncio.run(run())
    assert json.loads(events[0][len("data: "):])["choices"][0]["text"] == "1"
    assert json.loads(events[-2][len("data: "):]) == {"error": {
        "message": "Internal server error.", "type": "server_error", "param": None, "code": None}}
    assert events[-1] == SSE_DONE


def test_a_model_scorer_must_fit_prompt_and_completion():
    scorers = services(scorers=ScorerCatalog([ShortScorer()]))
    search = BestOfN(type="best_of_n", n=2, scorer="short")
    scorers.check_search_fits(search, prompt_tokens=4, max_tokens=6, param="max_tokens")
    scorers.check_search_fits(None, prompt_tokens=400, max_tokens=60, param="max_tokens")
    with pytest.raises(InvalidRequest) as info:
        scorers.check_search_fits(search, prompt_tokens=4, max_tokens=7, param="max_completion_tokens")
    assert info.value.param == "max_completion_tokens" and "at most 10 tokens" in info.value.message
