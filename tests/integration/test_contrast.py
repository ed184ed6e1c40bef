"""`contrast` guidance through the real server on the demo model: demo-genarm as the expert and the base
itself (demo-reference, a plain causal-LM checkpoint) as the reference. A contrast request reports the KL
it cost, strength 0 is the base's output exactly, a KL budget holds, the module is listed, and bad entries
are 400s naming the field."""

from __future__ import annotations

import pytest

from models.demo.task import sample_problems

pytestmark = pytest.mark.engine

PROMPTS = [p.prompt for p in sample_problems(3, seed=77)]
CONTRAST = {"type": "contrast", "model": "demo-genarm", "reference": "demo-reference"}


def complete(openai_client, model_name, guidance=None, **kwargs):
    extra = {"guidance": guidance} if guidance is not None else {}
    return openai_client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=10,
                                            extra_body=extra, **kwargs)


def test_a_contrast_request_reports_its_kl_and_steers(openai_client, model_name):
    plain = complete(openai_client, model_name, temperature=0.0)
    guided = complete(openai_client, model_name, [{**CONTRAST, "strength": 3.0}], temperature=0.0)
    reports = [c.model_extra["guidance"] for c in guided.choices]
    assert all(r["kl"] > 0 for r in reports)
    assert sum(r["steps"] for r in reports) == guided.usage.completion_tokens  # every token steered
    assert guided.model_extra["guidance"]["entries"] == [
        {**CONTRAST, "strength": 3.0, "top_k": -1, "min_entropy": 0.0}]
    assert [c.text for c in guided.choices] != [c.text for c in plain.choices]  # strength 3 changes some answer


def test_strength_zero_is_the_base_output_with_zero_kl(openai_client, model_name):
    plain = complete(openai_client, model_name, temperature=1.0, seed=5)
    zero = complete(openai_client, model_name, [{**CONTRAST, "strength": 0.0}], temperature=1.0, seed=5)
    assert [c.text for c in zero.choices] == [c.text for c in plain.choices]
    assert all(c.model_extra["guidance"]["kl"] == 0.0 for c in zero.choices)


def test_a_budgeted_contrast_stays_within_max_kl(openai_client, model_name):
    result = complete(openai_client, model_name, [{**CONTRAST, "strength": 8.0, "max_kl": 0.25}],
                      temperature=1.0, seed=9, n=2)
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        assert report["kl"] <= 0.25 * (1 + 1e-5) + 1e-6
        assert report["budget"] == {"max_kl": 0.25, "kl_per_token": None}


def test_contrast_is_listed_with_its_reference_parameter(http):
    listing = http.get("/v1/guidance").json()
    [module] = [m for m in listing["modules"] if m["type"] == "contrast"]
    assert module["guide_heads"] == ["lm"] and module["default_top_k"] == -1
    assert {"model", "reference", "strength", "top_k", "min_entropy", "max_kl"} <= set(module["parameters"])
    assert "log pi_expert" in module["description"]
    models = {m["name"]: m for m in listing["guide_models"]}
    assert models["demo-reference"] == {"name": "demo-reference", "head": "lm", "scoring": "q"}


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"reference": None}, "guidance[0].reference", "Missing"),
        ({"reference": "demo-value"}, "guidance[0].reference", "'bernoulli' head"),
        ({"reference": "demo-genarm"}, "guidance[0].reference", "another guide model"),
        ({"reference": "nope"}, "guidance[0].reference", "Unknown guide model"),
        ({"model": "demo-arm"}, "guidance[0].model", "'arm' head"),
    ],
)
def test_bad_contrast_entries_are_400s_naming_the_field(http, model_name, change, param, words):
    entry = {k: v for k, v in {**CONTRAST, "strength": 1.0, **change}.items() if v is not None}
    response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPTS[0], "max_tokens": 4,
                                                  "guidance": [entry]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
