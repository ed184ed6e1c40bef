"""A KL budget given by the request (top-level `max_kl`, `kl_per_token`) at the HTTP edge: the four
endpoints refuse bad values with a 400 naming the field, a budget needs guidance entries, and the
response's `guidance` object gives the request's bounds as it asked them (the folding rule itself:
test_kl_budget; the cache key: test_cache)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from guidance.kl_budget import KLBudget
from server.api.chat.protocol import ChatCompletionRequest
from server.api.completions.protocol import CompletionRequest
from server.api.generation import Prepared
from server.api.messages.protocol import MessagesRequest
from server.api.responses.protocol import ResponsesRequest
from server.errors import InvalidRequest, validation_error
from tests.unit.test_generation_failures import services
from tests.unit.test_guidance_spec import CATALOG

GUIDANCE = [{"type": "qsharp", "model": "value", "strength": 4.0}]
BODIES = {
    CompletionRequest: {"model": "m", "prompt": "1+1="},
    ChatCompletionRequest: {"model": "m", "messages": [{"role": "user", "content": "1+1="}]},
    ResponsesRequest: {"model": "m", "input": "1+1="},
    MessagesRequest: {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "1+1="}]},
}


@pytest.mark.parametrize("model", list(BODIES), ids=lambda model: model.__name__)
@pytest.mark.parametrize(("field", "value", "words"), [
    ("max_kl", -0.5, "greater than or equal to 0"), ("max_kl", float("inf"), "finite"),
    ("max_kl", float("nan"), "finite"), ("max_kl", "lots", "number"),
    ("kl_per_token", -1e-3, "greater than or equal to 0"), ("kl_per_token", float("-inf"), "finite"),
    ("kl_per_token", [0.1], "number"),
])
def test_a_bad_request_budget_is_a_400_naming_the_field(model, field, value, words):
    with pytest.raises(ValidationError) as info:
        model.model_validate({**BODIES[model], "guidance": GUIDANCE, field: value})
    error = validation_error(RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]))
    assert (error.status, error.param) == (400, field)
    assert error.message.startswith(f"Invalid value for '{field}'") and words in error.message


def test_the_request_budget_is_read_from_both_fields():
    body = dict(BODIES[CompletionRequest], guidance=GUIDANCE)
    assert CompletionRequest.model_validate(body).kl_budget is None
    assert CompletionRequest.model_validate({**body, "max_kl": 0.0}).kl_budget == KLBudget(max_kl=0.0)
    assert CompletionRequest.model_validate({**body, "kl_per_token": 0.1, "max_kl": 2}).kl_budget == \
        KLBudget(max_kl=2.0, kl_per_token=0.1)


@pytest.mark.parametrize("entries", [None, []])
@pytest.mark.parametrize(("budget", "param"), [
    (KLBudget(max_kl=1.0), "max_kl"), (KLBudget(kl_per_token=0.1), "kl_per_token")])
def test_a_request_budget_without_guidance_is_a_400_naming_it(entries, budget, param):
    resolver = services(catalog=CATALOG, settings=SimpleNamespace(max_guidance_entries=4))
    assert resolver.resolve_guidance(entries) == []  # unguided, no budget: nothing to resolve
    with pytest.raises(InvalidRequest) as info:
        resolver.resolve_guidance(entries, budget)
    assert (info.value.status, info.value.param) == (400, param)
    assert "means nothing on an unguided request" in info.value.message


def test_the_response_gives_the_folded_entries_and_the_request_bounds_as_asked():
    resolver = services(catalog=CATALOG, settings=SimpleNamespace(max_guidance_entries=4))
    budget = KLBudget(max_kl=0.5)
    entries = [{**GUIDANCE[0], "max_kl": 2.0, "kl_per_token": 0.1}]
    summary = Prepared([], resolver.resolve_guidance(entries, budget), budget=budget).guidance_summary()
    assert summary == {"entries": [{"type": "qsharp", "model": "value", "strength": 4.0, "top_k": 20,
                                    "min_entropy": 0.0, "max_kl": 0.5, "kl_per_token": 0.1}],
                       "max_kl": 0.5}
    assert "max_kl" not in Prepared([], resolver.resolve_guidance(entries)).guidance_summary()
