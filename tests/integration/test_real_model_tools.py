"""Structured outputs and tool calling on the real SmolLM2 chat model, through the openai SDK, with
guidance: the grammar (a JSON schema, or the calls' schema vLLM's hermes parser derives) decides
which tokens are allowed, the value model reweights the allowed ones, and the KL is finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.real_model]

GUIDED = {"guidance": [{"type": "qsharp", "model": "value-r2", "strength": 4.0}]}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> str:
    return smollm2_dir.name


def test_guided_json_schema_answer_is_valid_json_with_finite_kl(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=60,
        temperature=0.7, seed=2, extra_body=GUIDED,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = response.choices[0]
    person = json.loads(choice.message.content)
    assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120
    report = choice.model_extra["guidance"]
    assert math.isfinite(report["kl"]) and report["steps"] == response.usage.completion_tokens


def test_json_object_mode(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give a JSON object with one key."}], max_tokens=40,
        temperature=0, response_format={"type": "json_object"})
    if response.choices[0].finish_reason == "stop":  # a cut-off object cannot be complete
        assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_required_tool_call_guided(client, model):
    response = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                              max_tokens=60, temperature=0, extra_body=GUIDED)
    choice = response.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert choice.finish_reason == "tool_calls" and math.isfinite(choice.model_extra["guidance"]["kl"])


def test_named_tool_call_streamed_equals_whole(client, model):
    kwargs = dict(model=model, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    (call,) = whole.message.tool_calls
    assert whole.finish_reason == "stop"  # OpenAI: a named call keeps the plain finish reason
    names, arguments, reasons = [], "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or ():
                if fragment.function.name:
                    names.append(fragment.function.name)
                arguments += fragment.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert names == ["get_weather"] and json.loads(arguments) == json.loads(call.function.arguments)
    assert reasons == ["stop"]


def test_tool_results_go_back_into_the_conversation(client, model):
    conversation = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"}]
    response = client.chat.completions.create(model=model, messages=conversation, tools=[WEATHER],
                                              tool_choice="none", max_tokens=20, temperature=0)
    assert response.choices[0].message.content and not response.choices[0].message.tool_calls


def test_messages_tool_use_streamed_equals_whole_and_results_go_back(smollm2_server, model):
    """Anthropic's Messages API on the same path: a forced tool is a tool_use block, streamed as
    input_json_delta fragments; its tool_result goes back into the conversation."""
    import anthropic

    claude = anthropic.Anthropic(base_url=smollm2_server.base_url, api_key="unused", max_retries=0, timeout=300)
    tool = {"name": "get_weather", "description": "The weather in a city", "strict": True,  # the schema enforced
            "input_schema": WEATHER["function"]["parameters"]}
    kwargs = dict(model=model, max_tokens=60, messages=ASK, tools=[tool],
                  tool_choice={"type": "tool", "name": "get_weather"},
                  extra_body={"temperature": 0, "cache": False, **GUIDED})
    whole = claude.messages.create(**kwargs)
    (call,) = whole.content
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    assert whole.stop_reason == "tool_use" and math.isfinite(whole.model_extra["guidance"]["kl"])
    events = list(claude.messages.create(stream=True, **kwargs))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    arguments = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert [(b.type, b.name) for b in starts] == [("tool_use", "get_weather")] and json.loads(arguments) == call.input
    assert events[-2].delta.stop_reason == "tool_use"
    answer = claude.messages.create(
        model=model, max_tokens=20, tools=[tool], tool_choice={"type": "none"}, extra_body={"temperature": 0},
        messages=[*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                           "input": call.input}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                "content": "Sunny, 21 C"}]}])
    assert answer.content[0].type == "text" and answer.content[0].text and answer.stop_reason != "tool_use"
