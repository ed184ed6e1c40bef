"""KL budgets through the real server on the demo model and its trained guides: the reported KL of every
choice stays within `max_kl` (streamed and not, every module, a composition, blockwise search), a looser
budget steers more, a budget given by the request steers as the same budget on the entry, and bad
budgets are 400s naming the field."""

from __future__ import annotations

import pytest

from models.demo.task import sample_problems

pytestmark = pytest.mark.engine

PROMPTS = [p.prompt for p in sample_problems(4, seed=2024)]
ENTRIES = {
    "qsharp": {"type": "qsharp", "model": "demo-value"},
    "cd": {"type": "cd", "model": "demo-prefix", "strength": 20.0},
    "arm": {"type": "arm", "model": "demo-arm", "strength": 8.0},
    "genarm": {"type": "genarm", "model": "demo-genarm", "strength": 4.0},
}


def within(kl: float, budget: float) -> bool:
    """The report's KL is at most the budget, up to float32 rounding of the running sum."""
    return kl <= budget * (1 + 1e-5) + 1e-6


def guided(openai_client, model_name, guidance, n=3, **kwargs):
    return openai_client.completions.create(
        model=model_name, prompt=PROMPTS, max_tokens=12, temperature=1.0, seed=7, n=n,
        extra_body={"guidance": guidance, **kwargs.pop("extra_body", {})}, **kwargs)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_choice_reports_kl_within_max_kl_streamed_and_not(openai_client, model_name, name):
    max_kl = 0.3
    guidance = [{**ENTRIES[name], "max_kl": max_kl}]
    whole = guided(openai_client, model_name, guidance)
    streamed = {}
    for chunk in guided(openai_client, model_name, guidance, stream=True):
        for choice in chunk.choices:
            if choice.finish_reason:
                streamed[choice.index] = choice.model_extra["guidance"]
    assert len(whole.choices) == len(streamed) == 3 * len(PROMPTS)
    for report in [c.model_extra["guidance"] for c in whole.choices] + list(streamed.values()):
        assert within(report["kl"], max_kl), report
        assert report["budget"] == {"max_kl": max_kl, "kl_per_token": None}
        [strength] = report["strengths"]
        cap = ENTRIES[name].get("strength", 1000.0)
        assert 0 <= strength["min"] <= strength["mean"] <= strength["max"] <= cap
    # seeded: the streamed reports are the same requests' reports, up to the float rounding of a guide forward
    # that depends on what else shares its batch (seen: 1.1e-4 relative)
    for choice in whole.choices:
        assert streamed[choice.index]["kl"] == pytest.approx(choice.model_extra["guidance"]["kl"], rel=1e-3, abs=1e-7)


def test_a_looser_budget_steers_more(openai_client, model_name):
    reports = {}
    for max_kl in (0.02, 1.0):
        result = guided(openai_client, model_name, [{**ENTRIES["qsharp"], "strength": 8.0, "max_kl": max_kl}])
        reports[max_kl] = [c.model_extra["guidance"] for c in result.choices]
        assert all(within(r["kl"], max_kl) for r in reports[max_kl])
    tight, loose = reports[0.02], reports[1.0]
    assert sum(r["kl"] for r in loose) > 5 * sum(r["kl"] for r in tight)
    assert sum(r["strengths"][0]["mean"] for r in loose) > sum(r["strengths"][0]["mean"] for r in tight)


def test_kl_per_token_and_a_composition_share_one_scale(openai_client, model_name):
    per_token = 0.05
    guidance = [{**ENTRIES["cd"], "kl_per_token": per_token}, {**ENTRIES["genarm"], "max_kl": 0.4}]
    result = guided(openai_client, model_name, guidance)
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        assert report["budget"] == {"max_kl": 0.4, "kl_per_token": per_token}
        assert within(report["kl"], min(0.4, per_token * report["steps"]))
        cd, genarm = report["strengths"]  # one scale: strengths in the ratio of the caps (20 : 4)
        assert cd["max"] == pytest.approx(5 * genarm["max"], rel=1e-6)
        assert cd["mean"] == pytest.approx(5 * genarm["mean"], rel=1e-6)


def test_blockwise_search_keeps_the_kept_sequence_within_max_kl(openai_client, model_name):
    max_kl = 0.2
    result = guided(openai_client, model_name, [{**ENTRIES["qsharp"], "max_kl": max_kl}], n=1,
                    extra_body={"search": {"type": "blockwise", "candidates": 2, "block_tokens": 4,
                                           "scorer": "demo-prefix"}})
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        assert within(report["kl"], max_kl) and report["budget"]["max_kl"] == max_kl


def test_a_request_budget_steers_as_the_same_budget_on_the_entry_and_keys_its_own_cache_entry(
        openai_client, server, model_name):
    max_kl = 0.3

    def cache_count(outcome: str) -> float:
        return server.metric("alignserve_cache_requests_total", backend="memory", outcome=outcome)

    on_entry = guided(openai_client, model_name, [{**ENTRIES["qsharp"], "max_kl": max_kl}])
    hits, misses = cache_count("hit"), cache_count("miss")
    on_request = guided(openai_client, model_name, [ENTRIES["qsharp"]], extra_body={"max_kl": max_kl})
    # computed, not the entry-budget request's cached response: the request-level budget is in the key
    assert (cache_count("hit"), cache_count("miss")) == (hits, misses + 1)
    assert [c.text for c in on_request.choices] == [c.text for c in on_entry.choices]  # seeded: the same choices
    for by_request, by_entry in zip(on_request.choices, on_entry.choices):
        report = by_request.model_extra["guidance"]
        assert within(report["kl"], max_kl) and report["budget"] == {"max_kl": max_kl, "kl_per_token": None}
        # the same tokens; the KL up to the batch-dependent float rounding of the guide's forward (seen: 1.1e-4)
        assert report["kl"] == pytest.approx(by_entry.model_extra["guidance"]["kl"], rel=1e-3, abs=1e-7)
    summary = on_request.model_extra["guidance"]
    assert summary["max_kl"] == max_kl and summary["entries"][0]["max_kl"] == max_kl
    assert "max_kl" not in on_entry.model_extra["guidance"]

    # the same request again is a hit; another request-level budget is not
    guided(openai_client, model_name, [ENTRIES["qsharp"]], extra_body={"max_kl": max_kl})
    assert cache_count("hit") == hits + 1
    guided(openai_client, model_name, [ENTRIES["qsharp"]], n=1, extra_body={"max_kl": 0.25})
    assert (cache_count("hit"), cache_count("miss")) == (hits + 1, misses + 2)

    # streamed (uncached, so the engine runs it): every choice held to the request's budget
    streamed = {}
    for chunk in guided(openai_client, model_name, [ENTRIES["qsharp"]], stream=True,
                        extra_body={"max_kl": max_kl, "cache": False}):
        for choice in chunk.choices:
            if choice.finish_reason:
                streamed[choice.index] = choice.model_extra["guidance"]
    assert len(streamed) == len(on_request.choices)
    for report in streamed.values():
        assert within(report["kl"], max_kl) and report["budget"] == {"max_kl": max_kl, "kl_per_token": None}


@pytest.mark.parametrize(
    ("entry", "param"),
    [({"max_kl": -0.5}, "guidance[0].max_kl"), ({"kl_per_token": "lots"}, "guidance[0].kl_per_token"),
     ({"max_kl": None}, "guidance[0].strength")],
)
def test_bad_budgets_are_400_naming_the_field(http, model_name, entry, param):
    guidance = [{"type": "qsharp", "model": "demo-value", **entry}]
    for path, body in (("/v1/completions", {"prompt": PROMPTS[0]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]})):
        response = http.post(path, json={"model": model_name, "guidance": guidance, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("fields", "param"), [({"max_kl": -0.5}, "max_kl"), ({"kl_per_token": "lots"}, "kl_per_token"),
                                               ({"max_kl": 1.0, "guidance": []}, "max_kl")])
def test_bad_request_budgets_are_400_naming_the_field(http, model_name, fields, param):
    body = {"model": model_name, "prompt": PROMPTS[0], "guidance": [ENTRIES["qsharp"]], **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_guidance_listing_names_the_budget_parameters(http):
    for module in http.get("/v1/guidance").json()["modules"]:
        assert {"max_kl", "kl_per_token"} <= set(module["parameters"]), module["type"]
        assert module["parameters"]["max_kl"]["anyOf"][0]["minimum"] == 0.0
