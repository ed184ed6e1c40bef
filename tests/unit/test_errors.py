"""Validation errors map to 400s whose `param` is the exact field path."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.chat.protocol import ChatCompletionRequest
from server.api.completions.protocol import CompletionRequest
from server.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, api_error_body, field_path, validation_error


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body", "guidance", 1, "strength"), "guidance[1].strength"),
        (("body", "prompt", "list[list[int]]", 1, 0), "prompt[1][0]"),
        (("body", "prompt", "str"), "prompt"),
        (("body", "messages", 0, "content", "function-after[x]", 0, "type"), "messages[0].content[0].type"),
        (("body",), None),
        (("query", "x"), "query.x"),
    ],
)
def test_field_path(loc, path):
    assert field_path(loc) == path


def _request_error(model, body: dict) -> RequestValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


def test_union_error_names_the_deepest_member():
    error = validation_error(_request_error(CompletionRequest, {"model": "m", "prompt": [[1], [2, -3]]}))
    assert isinstance(error, InvalidRequest)
    assert error.status == 400 and error.param == "prompt[1][1]"
    assert "greater than or equal to 0" in error.message


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_too_many_stop_strings_name_the_limit_vllm_sets(model):
    """vLLM takes at most VLLM_MAX_STOP_STRINGS (4): more is refused by our model, naming the limit (the list
    member's error), not as "should be a valid string" (the str member's) or by vLLM's model later."""
    body = {"model": "m", "stop": ["\ndef", "\nclass", "\nif", "\nprint", "\n#"],
            **({"prompt": "x"} if model is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]})}
    error = validation_error(_request_error(model, body))
    assert error.param == "stop" and "at most 4 items" in error.message
    four = model.model_validate({**body, "stop": body["stop"][:4]})
    assert four.as_vllm_request().stop == body["stop"][:4]


def test_extra_field_message():
    error = validation_error(_request_error(ChatCompletionRequest, {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "guidanc": []}))
    assert error.param == "guidanc"
    assert error.message == "Unrecognized request argument supplied: guidanc"


def test_missing_field_message():
    error = validation_error(_request_error(CompletionRequest, {"model": "m"}))
    assert (error.param, error.message) == ("prompt", "Missing required parameter: prompt")


def test_invalid_json():
    exc = RequestValidationError([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error"}])
    error = validation_error(exc)
    assert error.param is None and error.code == "invalid_json"


def test_envelopes():
    assert api_error_body(ModelNotFound("x")) == {"error": {
        "message": "The model `x` does not exist.", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}
    too_long = ContextLengthExceeded("too long", param="messages")
    assert too_long.status == 400 and too_long.code == "context_length_exceeded"
