"""Step-level search (beam, DVTS, particle filtering) through the real server and engine on the demo models."""

from __future__ import annotations

import httpx
import pytest

from models.demo.tokenizer import vocabulary
from tests.conftest import assert_stopped_early, post_and_leave

pytestmark = pytest.mark.engine

PROMPT = "234+567="
SCORER = "demo-prefix"  # a prefix scorer: it scores partial solutions


def beam(**spec) -> dict:
    return {"type": "beam", "beam_width": 2, "expansions": 3, "scorer": SCORER, **spec}


def complete(openai_client, model_name, search: dict, **kwargs):
    extra = {"search": search, **kwargs.pop("extra_body", {})}
    return openai_client.completions.create(model=model_name, prompt=PROMPT, extra_body=extra, **kwargs)


@pytest.mark.parametrize("search", [
    beam(step_tokens=2, max_steps=6),
    {"type": "dvts", "n": 6, "beam_width": 3, "scorer": SCORER, "step_tokens": 2, "max_steps": 6},
    {"type": "particle_filter", "particles": 4, "scorer": SCORER, "step_tokens": 2, "max_steps": 6,
     "weighting": "score"},
])
def test_each_step_search_answers_and_reports_its_steps(openai_client, model_name, search):
    result = complete(openai_client, model_name, search, max_tokens=12, temperature=1.0, seed=3)
    [choice] = result.choices
    report = choice.model_extra["guidance"]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert report["kept_tokens"] == result.usage.completion_tokens <= 12
    assert report["generated_tokens"] >= report["kept_tokens"]
    rounds = report["search_steps"]
    assert 1 <= len(rounds) <= 6
    assert rounds[0]["candidates"] == {"beam": 3, "dvts": 6, "particle_filter": 4}[search["type"]]
    assert report["score"] == report["candidate_scores"][report["selected"]]
    if search["type"] != "particle_filter":
        assert report["score"] == max(report["candidate_scores"])  # selection temperature 0


def test_a_step_ends_at_the_delimiter_found_by_the_engine_and_streams_once_decided(openai_client, model_name):
    """Steps end at the first token holding "1" (vLLM's stop string; the token stays in the solution) or at
    max_step_tokens; a streamed search sends whole steps, and the same seeded request answers the same."""
    search = beam(step_delimiter="1", max_step_tokens=6, max_steps=5)
    kwargs = dict(max_tokens=24, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True, "cache": False, "return_token_ids": True})
    whole = complete(openai_client, model_name, search, **kwargs).choices[0]
    chunks = [c for chunk in complete(openai_client, model_name, search, stream=True, **kwargs)
              for c in chunk.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.model_extra["token_ids"]] == whole.model_extra["token_ids"]
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    text_of = {i: t for t, i in vocabulary().items()}
    steps, ids = [], list(whole.model_extra["token_ids"])
    while ids:
        end = next((k + 1 for k, t in enumerate(ids[:6]) if "1" in text_of[t]), min(6, len(ids)))
        steps.append(ids[:end])
        ids = ids[end:]
    assert len(steps) <= 5 and any(len(s) < 6 for s in steps[:-1]), steps  # some step ended at its "1"
    boundaries = {sum(len(s) for s in steps[:k]) for k in range(len(steps) + 1)}
    sent = 0
    for chunk in chunks[:-1]:  # decided steps: whole steps only
        sent += len(chunk.model_extra["token_ids"])
        assert chunk.text and sent in boundaries, (steps, [c.text for c in chunks])
    assert complete(openai_client, model_name, search, **kwargs).choices[0].text == whole.text


def test_weighted_majority_names_the_answer(openai_client, model_name):
    search = beam(step_tokens=4, answers="demo-verifier")
    result = complete(openai_client, model_name, search, max_tokens=8, temperature=1.0, seed=2)
    report = result.choices[0].model_extra["guidance"]
    assert report["answer"] in result.choices[0].text


def test_guided_expansions_report_the_kept_solution_kl(openai_client, model_name):
    guidance = [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]
    result = complete(openai_client, model_name, beam(step_tokens=3), max_tokens=9, temperature=1.0, seed=4,
                      extra_body={"guidance": guidance, "ignore_eos": True})
    report = result.choices[0].model_extra["guidance"]
    assert report["kl"] > 0 and report["steps"] == result.usage.completion_tokens == 9


@pytest.mark.parametrize("search, param", [
    (beam(scorer="demo-verifier"), "search.scorer"),
    ({"type": "dvts", "n": 5, "beam_width": 2, "scorer": SCORER}, "search.n"),
    (beam(expansions=100), "search.expansions"),
])
def test_bad_step_search_is_400_naming_the_field(http, model_name, search, param):
    response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, "search": search})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_listing_describes_the_step_searches(http):
    types = {t["type"]: t for t in http.get("/v1/guidance").json()["search"]["types"]}
    assert {"beam", "dvts", "particle_filter"} <= set(types)
    assert {"beam_width", "expansions", "step_delimiter", "step_tokens", "aggregate"} <= set(
        types["beam"]["parameters"])


def test_a_client_that_leaves_aborts_every_branch(server, model_name):
    assert server.wait_unfinished(lambda count: count == 0) == 0
    tokens_before = server.generated_tokens()
    body = {"model": model_name, "prompt": "1+1=", "max_tokens": 480, "ignore_eos": True, "temperature": 1.0,
            "search": beam(beam_width=4, expansions=4, step_tokens=8, max_steps=60),
            "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}
    assert (outcome := post_and_leave(server, "/v1/completions", body, after_s=2.0)) is None, outcome
    assert_stopped_early(server, tokens_before, 16 * 480)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:  # the server still serves
        assert client.post("/v1/completions", json={"model": model_name, "prompt": "1+1=", "max_tokens": 2}
                           ).status_code == 200
