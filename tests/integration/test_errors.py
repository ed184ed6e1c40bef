"""Every error case returns the right status and the OpenAI error envelope."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.engine

LONG_PROMPT = "1" * 600  # over the demo model's 512-token context


def assert_envelope(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "1+1=", "temperature": 2.5}, "temperature"),
        ({"prompt": "1+1=", "top_p": 0}, "top_p"),
        ({"prompt": "1+1=", "n": 0}, "n"),
        ({"prompt": "1+1=", "n": 17}, "n"),
        ({"prompt": "1+1=", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "1+1=", "logprobs": 21}, "logprobs"),
        ({"prompt": "1+1=", "top_k": 0}, "top_k"),
        ({"prompt": "1+1=", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "1+1=", "stop": [""]}, "stop[0]"),
        ({"prompt": "1+1=", "seed": "x"}, "seed"),
        ({"prompt": "1+1=", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "1+1=", "stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
        ({"prompt": "1+1=", "best_of": 2}, "best_of"),
        ({"prompt": "1+1=", "unknown_field": 1}, "unknown_field"),
        ({"prompt": [[1, 2], [-1]]}, "prompt[1][0]"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 100000]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_completion_invalid_values_are_400_naming_the_field(http, model_name, body, param):
    assert_envelope(http.post("/v1/completions", json={"model": model_name, **body}), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
def test_chat_invalid_values_are_400_naming_the_field(http, model_name, body, param):
    assert_envelope(http.post("/v1/chat/completions", json={"model": model_name, **body}), 400, param)


def test_unknown_model_is_404(http):
    for path, body in (("/v1/completions", {"prompt": "1"}), ("/v1/chat/completions",
                                                              {"messages": [{"role": "user", "content": "1"}]})):
        error = assert_envelope(http.post(path, json={"model": "no-such-model", **body}), 404, "model",
                                "model_not_found")
        assert error["type"] == "invalid_request_error"
    assert_envelope(http.get("/v1/models/no-such-model"), 404, "model", "model_not_found")


def test_prompt_longer_than_context_is_400(http, model_name):
    assert_envelope(http.post("/v1/completions", json={"model": model_name, "prompt": LONG_PROMPT}),
                    400, "prompt", "context_length_exceeded")
    assert_envelope(http.post("/v1/chat/completions",
                              json={"model": model_name, "messages": [{"role": "user", "content": LONG_PROMPT}]}),
                    400, "messages", "context_length_exceeded")
    assert_envelope(http.post("/v1/completions", json={"model": model_name, "prompt": "1+1=", "max_tokens": 510}),
                    400, "max_tokens", "context_length_exceeded")
    assert_envelope(http.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": "1"}], "max_completion_tokens": 510}),
        400, "max_completion_tokens", "context_length_exceeded")


@pytest.mark.parametrize("content", [b"not json", b"{\"model\": ", b"[1, 2]", b"\"text\"", b""])
def test_non_json_or_non_object_bodies_are_400(http, content):
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_envelope(response, 400, None)


def test_form_body_is_400(http):
    assert_envelope(http.post("/v1/completions", data={"model": "x"}), 400, None)


def test_unknown_route_is_404_in_envelope(http):
    assert_envelope(http.get("/v1/nothing-here"), 404, None)


def test_sdk_raises_typed_errors(openai_client, model_name):
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.completions.create(model=model_name, prompt="1", temperature=9)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "1"}])
