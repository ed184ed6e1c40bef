"""Request-level search through the real server and engine on the demo models (best-of-N, blockwise)."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from openai import AsyncOpenAI

from guidance.verifiers import get_verifier
from models.demo.task import sample_problems
from tests.conftest import assert_stopped_early, metric_value, post_and_leave

pytestmark = pytest.mark.engine

PROMPT = "234+567="
VERIFIER = get_verifier("demo-verifier")


def best_of(n: int, scorer: str = "demo-verifier", **spec) -> dict:
    return {"type": "best_of_n", "n": n, "scorer": scorer, **spec}


def blockwise(candidates: int, block_tokens: int, scorer: str = "demo-prefix", **spec) -> dict:
    return {"type": "blockwise", "candidates": candidates, "block_tokens": block_tokens, "scorer": scorer, **spec}


def complete(client, model, search=None, guidance=None, **kwargs):
    extra = dict(kwargs.pop("extra_body", {}))
    if search is not None:
        extra["search"] = search
    if guidance is not None:
        extra["guidance"] = guidance
    return client.completions.create(model=model, extra_body=extra, **kwargs)


def pass_at_1(server, model_name, prompts: list[str], search: dict | None) -> float:
    async def run() -> list[float]:
        async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                               timeout=300) as client:
            async def solve(i: int, prompt: str) -> float:
                result = await complete(client, model_name, search, prompt=prompt, temperature=1.0,
                                        max_tokens=8, seed=1000 + i)
                return VERIFIER(prompt, result.choices[0].text)

            return await asyncio.gather(*(solve(i, p) for i, p in enumerate(prompts)))

    rewards = asyncio.run(run())
    return sum(rewards) / len(rewards)


def test_best_of_1_is_the_plain_request(openai_client, model_name):
    for scorer in ("demo-verifier", "demo-reward"):
        kwargs = dict(prompt=PROMPT, max_tokens=10, temperature=1.0, seed=21, n=3)
        plain = complete(openai_client, model_name, **kwargs)
        searched = complete(openai_client, model_name, best_of(1, scorer), **kwargs)
        assert [c.text for c in searched.choices] == [c.text for c in plain.choices]
        assert [c.finish_reason for c in searched.choices] == [c.finish_reason for c in plain.choices]
        for choice in searched.choices:
            report = choice.model_extra["guidance"]
            assert report["selected"] == 0 and report["candidate_scores"] == [report["score"]]


def test_best_of_n_keeps_the_best_scored_candidate(openai_client, model_name):
    result = complete(openai_client, model_name, best_of(6, "demo-reward"), prompt=PROMPT, max_tokens=8,
                      temperature=1.0, seed=4, n=2)
    assert len(result.choices) == 2
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        scores = report["candidate_scores"]
        assert len(scores) == 6 and report["score"] == max(scores)
        assert report["selected"] == scores.index(max(scores))
        assert (report["kl"], report["steps"]) == (0.0, 0)
    assert result.model_extra["guidance"]["search"] == {
        "type": "best_of_n", "n": 6, "scorer": "demo-reward", "temperature": 0.0}
    # Each candidate counts: the usage is that of the kept completions.
    assert result.usage.completion_tokens <= 2 * 8


def test_best_of_8_beats_the_base(server, model_name):
    prompts = [p.prompt for p in sample_problems(60, seed=777)]
    base = pass_at_1(server, model_name, prompts, None)
    by_verifier = pass_at_1(server, model_name, prompts, best_of(8))
    by_arm = pass_at_1(server, model_name, prompts, best_of(8, "demo-arm"))  # summed ARM token rewards
    assert by_verifier >= base + 0.2, (base, by_verifier)  # measured: 0.55 -> 0.88
    assert by_arm >= base + 0.1, (base, by_arm)


def test_soft_best_of_n_is_reproducible_with_a_seed(openai_client, model_name):
    kwargs = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=9, n=4, extra_body={"cache": False})
    spec = best_of(4, "demo-reward", temperature=0.5)
    first, second = (complete(openai_client, model_name, spec, **kwargs) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.model_extra["guidance"] for c in first.choices] == [c.model_extra["guidance"] for c in second.choices]


def test_best_of_n_over_guided_samples_reports_their_kl(openai_client, model_name):
    guidance = [{"type": "qsharp", "model": "demo-value", "strength": 4.0}]
    result = complete(openai_client, model_name, best_of(3, "demo-reward"), guidance, prompt=PROMPT,
                      max_tokens=6, temperature=1.0, seed=2, extra_body={"ignore_eos": True})
    report = result.choices[0].model_extra["guidance"]
    assert report["steps"] == 6 and report["kl"] > 0 and len(report["candidate_scores"]) == 3


def test_streamed_best_of_n_sends_the_kept_completion_once_scored(openai_client, model_name):
    kwargs = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=13, n=2, extra_body={"cache": False})
    whole = complete(openai_client, model_name, best_of(4, "demo-reward"), **kwargs)
    chunks = [c for chunk in complete(openai_client, model_name, best_of(4, "demo-reward"), stream=True, **kwargs)
              for c in chunk.choices]
    assert sorted(c.index for c in chunks) == [0, 1]  # one chunk per choice: the whole kept completion
    for chunk in chunks:
        assert chunk.text == whole.choices[chunk.index].text
        assert chunk.model_extra["guidance"] == whole.choices[chunk.index].model_extra["guidance"]


def test_chat_best_of_n(openai_client, model_name):
    result = openai_client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": PROMPT}], temperature=1.0, seed=3, max_tokens=8,
        extra_body={"search": best_of(4)})
    report = result.choices[0].model_extra["guidance"]
    assert report["score"] == VERIFIER(PROMPT, result.choices[0].message.content) == max(report["candidate_scores"])


def test_blockwise_searches_block_by_block(openai_client, model_name):
    max_tokens, block = 10, 3
    result = complete(openai_client, model_name, blockwise(4, block), prompt=PROMPT, max_tokens=max_tokens,
                      temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    report = choice.model_extra["guidance"]
    assert choice.finish_reason == "length" and result.usage.completion_tokens == max_tokens
    assert len(report["candidate_scores"]) == len(report["selected"]) == 4  # ceil(10 / 3) blocks
    assert all(len(scores) == 4 for scores in report["candidate_scores"])
    for scores, kept in zip(report["candidate_scores"], report["selected"]):
        assert scores[kept] == max(scores)
    assert report["score"] == report["candidate_scores"][-1][report["selected"][-1]]


def test_blockwise_streams_blocks_and_matches_the_whole_response(openai_client, model_name):
    kwargs = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=8, extra_body={"ignore_eos": True, "cache": False})
    spec = blockwise(3, 4)
    whole = complete(openai_client, model_name, spec, **kwargs)
    chunks = [c for chunk in complete(openai_client, model_name, spec, stream=True, **kwargs) for c in chunk.choices]
    assert len(chunks) == 3 and all(len(c.text) <= 4 for c in chunks)  # char-level tokens, 4 a block
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    assert [c.finish_reason for c in chunks] == [None, None, "length"]


def test_blockwise_changes_the_output_and_stops_with_its_kept_block(openai_client, model_name):
    prompts = [p.prompt for p in sample_problems(12, seed=31)]
    plain = [complete(openai_client, model_name, prompt=p, max_tokens=8, temperature=1.0, seed=i).choices[0]
             for i, p in enumerate(prompts)]
    searched = [complete(openai_client, model_name, blockwise(4, 2, "demo-verifier"), prompt=p, max_tokens=8,
                         temperature=1.0, seed=i).choices[0] for i, p in enumerate(prompts)]
    assert [c.text for c in searched] != [c.text for c in plain]
    # The demo model ends most answers with EOS well within 8 tokens: the kept block stops the search.
    stopped = [c for c in searched if c.finish_reason == "stop"]
    assert len(stopped) >= len(searched) // 2
    assert all(len(c.model_extra["guidance"]["selected"]) <= 4 for c in searched)


@pytest.mark.parametrize(("search", "param"), [
    (best_of(17), "search.n"),
    (best_of(2, "no-such-scorer"), "search.scorer"),
    (best_of(2, "demo-value"), "search.scorer"),  # a Q-type value model scores tokens, not sequences
    (blockwise(2, 65), "search.block_tokens"),
    (blockwise(17, 4), "search.candidates"),
    ({"type": "mcts", "n": 2, "scorer": "demo-reward"}, "search.type"),
    ({**best_of(2), "k": 1}, "search.k"),
    ("best_of_n", "search"),
    (best_of(2, "math"), "search.reference"),  # math compares with a reference: none given
    (best_of(2, "python-tests", reference="assert True"), "search.scorer"),  # runs code: not served
    (best_of(2, "models.tasks.chat_arith:reward"), "search.scorer"),  # requests never name code
])
def test_bad_search_is_400_naming_the_field(http, model_name, search, param):
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})):
        response = http.post(path, json={"model": model_name, "search": search, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_search_listing(http):
    search = http.get("/v1/guidance").json()["search"]
    assert [t["type"] for t in search["types"]] == ["best_of_n", "blockwise", "beam", "dvts", "particle_filter"]
    assert {s["name"] for s in search["scorers"]} == {"demo-verifier", "arith-first-line", "demo-reward",
                                                        "demo-prefix", "demo-value-hist", "demo-arm", "demo-genarm",
                                                        "demo-reference", "math", "exact", "regex", "json-schema"}
    assert {s["name"] for s in search["scorers"] if s.get("needs_reference")} == {"math", "exact", "regex",
                                                                                  "json-schema"}
    assert (search["max_candidates"], search["max_block_tokens"]) == (16, 64)


def test_best_of_n_by_exact_keeps_a_candidate_equal_to_the_reference(server, openai_client, model_name):
    """Candidate c is the plain request seeded seed + c; the server's `exact` compares each with
    search.reference, and when one of them is the answer the kept one is."""
    answer, seed, kwargs = "801", 40, dict(prompt=PROMPT, max_tokens=8, temperature=1.0)
    plain = [complete(openai_client, model_name, seed=seed + c, **kwargs).choices[0].text for c in range(8)]
    expected = [get_verifier("exact")(PROMPT, text, answer) for text in plain]
    assert 1.0 in expected, plain  # the demo model gets 234+567 right some of the time
    kept = complete(openai_client, model_name, best_of(8, "exact", reference=answer), seed=seed, **kwargs).choices[0]
    report = kept.model_extra["guidance"]
    assert kept.text.strip() == answer and report["score"] == 1.0
    assert report["candidate_scores"] == expected
    # A reference exact cannot read: every candidate scores 0, the request still answers, the failures are counted.
    before = server.metric("alignserve_verifier_errors_total", verifier="exact")
    bad = complete(openai_client, model_name, best_of(2, "exact", reference=801), seed=seed, **kwargs).choices[0]
    assert bad.model_extra["guidance"]["candidate_scores"] == [0.0, 0.0]
    assert server.metric("alignserve_verifier_errors_total", verifier="exact") - before == 2


def test_search_metrics(http, openai_client, model_name):
    def count() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("alignserve_search_candidate_score_count") and 'scorer="demo-reward"' in line \
                    and 'search="best_of_n"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    complete(openai_client, model_name, best_of(5, "demo-reward"), prompt=PROMPT, max_tokens=4, temperature=1.0,
             extra_body={"cache": False})
    assert count() == before + 5


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_during_best_of_n_aborts_every_candidate(server, model_name, stream):
    assert server.wait_unfinished(lambda count: count == 0) == 0
    tokens_before = server.generated_tokens()
    body = {"model": model_name, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 500,
            "temperature": 1.0, "ignore_eos": True, "n": 4, "search": best_of(8), "stream": stream,
            # Guided steps are slower: the candidates run for seconds even on a fast machine.
            "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()  # kept: a dropped line iterator closes the response
                assert next(lines).startswith("data: ")  # the role chunk, long before any pick
                running = server.wait_unfinished(lambda count: count == 32)  # 4 picks x 8 candidates
                assert running == 32, f"{running} running; the stream went on: {list(lines)[:5]}{server.log_tail()}"
        else:
            assert (outcome := post_and_leave(server, "/v1/chat/completions", body)) is None, outcome
    assert_stopped_early(server, tokens_before, 4 * 8 * 500)


def test_best_of_n_prefills_the_prompt_once(http, model_name):
    """The N candidates share the prompt's KV blocks: the first computes them, the others hit vLLM's prefix cache."""
    def metric(name: str) -> float:
        return metric_value(http.get("/metrics").text, name)

    prompt = "".join(random.Random(time.time_ns()).choice("0123456789+-=") for _ in range(400))  # never seen
    queries, hits = metric("vllm:prefix_cache_queries_total"), metric("vllm:prefix_cache_hits_total")
    response = http.post("/v1/completions", json={"model": model_name, "prompt": prompt, "max_tokens": 2,
                                                  "search": best_of(8), "cache": False})
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert metric("vllm:prefix_cache_queries_total") - queries == 8 * prompt_tokens
    shared = (metric("vllm:prefix_cache_hits_total") - hits) / 7  # per candidate after the first
    assert prompt_tokens - 256 < shared <= prompt_tokens  # every full KV block of the prompt


PRUNE = {"scorer": "demo-value-hist", "every": 4, "fraction": 0.5, "min_keep": 2}


def test_pruned_best_of_n_aborts_the_weakest_candidates_at_each_checkpoint(server, http, model_name):
    assert server.wait_unfinished(lambda count: count == 0) == 0
    pruned_before = server.metric("alignserve_search_pruned_candidates_total")
    # 200 tokens: a pruned candidate's abort has far longer than its checkpoint's scoring to take effect.
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": 8, "n": 2,
            "ignore_eos": True, "cache": False, "search": best_of(8, "demo-reward", prune=PRUNE)}
    first = http.post("/v1/completions", json=body).json()
    for choice in first["choices"]:
        report = choice["guidance"]
        checkpoints = report["checkpoints"]
        # 8 live at 4 tokens: 4 pruned; 4 live at 8 tokens: 2 pruned; then min_keep = 2 ends the checkpoints.
        assert [(c["tokens"], len(c["scored"]), len(c["pruned"])) for c in checkpoints] == [(4, 8, 4), (8, 4, 2)]
        for checkpoint in checkpoints:  # the lowest-scored live candidates go
            ranked = sorted(zip(checkpoint["scores"], checkpoint["scored"]), key=lambda p: (p[0], -p[1]))
            assert sorted(c for _, c in ranked[:len(checkpoint["pruned"])]) == checkpoint["pruned"]
        pruned = {c for checkpoint in checkpoints for c in checkpoint["pruned"]}
        scores = report["candidate_scores"]
        assert [i for i, s in enumerate(scores) if s is None] == sorted(pruned)
        assert report["selected"] not in pruned and report["score"] == max(s for s in scores if s is not None)
        # The 2 kept ran to 200 tokens; the 6 pruned stopped early (each past its checkpoint, short of 200).
        assert 2 * 200 + 4 * 4 + 2 * 8 <= report["generated_tokens"] < 8 * 200
    assert server.metric("alignserve_search_pruned_candidates_total") - pruned_before == 2 * 6
    assert server.wait_unfinished(lambda count: count == 0) == 0
    # Decisions are taken on exact lengths: a seeded pruned search is reproducible.
    second = http.post("/v1/completions", json=body).json()
    assert [(c["text"], c["guidance"]["checkpoints"], c["guidance"]["selected"]) for c in second["choices"]] == \
        [(c["text"], c["guidance"]["checkpoints"], c["guidance"]["selected"]) for c in first["choices"]]


@pytest.mark.parametrize(("prune", "param"), [
    ({**PRUNE, "scorer": "demo-verifier"}, "search.prune.scorer"),
    ({**PRUNE, "every": 0}, "search.prune.every"),
    ({**PRUNE, "fraction": 1.5}, "search.prune.fraction"),
    ({**PRUNE, "min_keep": 9}, "search.prune.min_keep"),
])
def test_bad_prune_is_400_naming_the_field(http, model_name, prune, param):
    response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, "max_tokens": 4,
                                                  "search": best_of(8, prune=prune)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
