"""/v1/messages and /v1/messages/count_tokens through Anthropic's SDK against the real server and engine."""

from __future__ import annotations

import anthropic
import pytest

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "45+67="}]
QSHARP = [{"type": "qsharp", "model": "demo-value", "strength": 2.0}]


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def streamed(client, **kwargs) -> tuple[str, list]:
    """The text of a streamed message, and its events."""
    events = list(client.messages.create(stream=True, **kwargs))
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    return text, events


def test_streamed_message_equals_the_whole_one(client, model_name):
    # cache: false, so that the stream is generated, not replayed from the first answer. (This SDK takes
    # no sampling arguments: they go in the body.)
    kwargs = dict(model=model_name, max_tokens=8, messages=MESSAGES, extra_body={"temperature": 0, "cache": False})
    whole = client.messages.create(**kwargs)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason == "end_turn" and whole.stop_sequence is None
    # <s><|user|>45+67=<|assistant|>: one token per character plus three special tokens.
    assert whole.usage.input_tokens == len("45+67=") + 3
    text, events = streamed(client, **kwargs)
    assert text == whole.content[0].text
    assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
    assert [e.type for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert events[-2].delta.stop_reason == "end_turn"
    assert events[-2].usage.output_tokens == whole.usage.output_tokens


def test_stop_sequence_and_max_tokens(client, model_name):
    kwargs = dict(model=model_name, max_tokens=8, messages=MESSAGES, extra_body={"temperature": 0})
    answer = client.messages.create(**kwargs).content[0].text
    stop = answer[-1]
    stopped = client.messages.create(stop_sequences=["+", stop], **kwargs)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    assert stopped.content[0].text == answer[:answer.index(stop)]
    text, events = streamed(client, stop_sequences=["+", stop], **kwargs)
    assert text == stopped.content[0].text
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == ("stop_sequence", stop)
    cut = client.messages.create(model=model_name, max_tokens=1, messages=MESSAGES)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1


def test_system_prompt_and_text_blocks(client, model_name):
    blocks = client.messages.create(
        model=model_name, max_tokens=6, system=[{"type": "text", "text": "be exact"}], extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [{"type": "text", "text": "45+"}, {"type": "text", "text": "67="}]}])
    joined = client.messages.create(model=model_name, max_tokens=6, system="be exact", messages=MESSAGES,
                                    extra_body={"temperature": 0})
    assert blocks.content == joined.content and blocks.usage == joined.usage


def test_guidance_reports_its_kl(client, model_name):
    kwargs = dict(model=model_name, max_tokens=6, messages=MESSAGES,
                  extra_body={"temperature": 1.0, "guidance": QSHARP})
    result = client.messages.create(**kwargs)
    report = result.model_extra["guidance"]
    assert report["steps"] > 0 and report["kl"] > 0
    assert [{key: entry[key] for key in QSHARP[0]} for entry in report["entries"]] == QSHARP
    _, events = streamed(client, **kwargs)
    delta = events[-2]
    assert delta.type == "message_delta" and delta.model_extra["guidance"]["steps"] > 0


def test_best_of_n_reports_candidate_scores(client, model_name):
    result = client.messages.create(
        model=model_name, max_tokens=8, messages=MESSAGES,
        extra_body={"temperature": 1.0, "search": {"type": "best_of_n", "n": 4, "scorer": "demo-arm"}})
    report = result.model_extra["guidance"]
    assert len(report["candidate_scores"]) == 4 and report["score"] == max(report["candidate_scores"])
    assert report["search"]["n"] == 4


def test_count_tokens_is_the_message_input(client, model_name):
    count = client.messages.count_tokens(model=model_name, system="be exact", messages=MESSAGES)
    result = client.messages.create(model=model_name, max_tokens=2, system="be exact", messages=MESSAGES)
    assert count.input_tokens == result.usage.input_tokens == len("be exact45+67=") + 4


BODY = {"model": "demo-base", "max_tokens": 4, "messages": MESSAGES}


@pytest.mark.parametrize(("body", "status", "error_type", "field"), [
    ({"model": "demo-base", "messages": MESSAGES}, 400, "invalid_request_error", "max_tokens"),
    ({**BODY, "guidance": [{**QSHARP[0], "strength": -1}]}, 400, "invalid_request_error", "guidance.0.strength"),
    ({**BODY, "search": {"type": "best_of_n", "n": 4, "scorer": "nope"}}, 400, "invalid_request_error", "search"),
    ({**BODY, "model": "nope"}, 404, "not_found_error", "model"),
    ({**BODY, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}]}]},
     400, "invalid_request_error", "messages.0.content.0"),
    ({**BODY, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, 400, "invalid_request_error",
     "tool_choice"),  # no --tool-call-parser: chat's 400
    ({**BODY, "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2000}, 400,
     "invalid_request_error", "thinking"),
    ({**BODY, "guidanse": []}, 400, "invalid_request_error", "guidanse"),
])
def test_errors_use_anthropics_envelope_and_name_the_field(http, body, status, error_type, field):
    response = http.post("/v1/messages", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == error_type
    assert error["error"]["message"].startswith(f"{field}"), error


def test_sdk_raises_for_an_unknown_model_and_a_failure_mid_stream(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=4, messages=MESSAGES)
    # The deadline passes before the engine answers: after message_start, Anthropic's error event.
    with pytest.raises(anthropic.APIStatusError) as info:
        list(client.messages.create(model="demo-base", max_tokens=64, messages=MESSAGES, stream=True,
                                    extra_body={"timeout_s": 0.001, "cache": False}))
    assert info.value.body["error"]["type"] == "overloaded_error"
