"""Anthropic's Messages API without the engine: a request as the chat request it runs as, a chat
completion as a message, a chat stream as a message stream, and the error envelope."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.api.generation import PreparedPrompt
from server.api.chat.serving import ChatPrepared
from server.api.messages.convert import message, stop_sequence
from server.api.messages.events import MessageEvents
from server.api.messages.protocol import CountTokensRequest, MessagesRequest
from server.api.messages.serving import MessagesServing
from server.api.streaming import SSE_DONE, sse
from server.engine import SamplingOptions
from server.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    TooManyRequests,
    anthropic_error_body,
    install_error_handlers,
)
from server.middleware import ApiKeyAuth
from server.prompts import PromptRenderer
from server.tracking import RequestTracker
from tests.unit.test_generation_failures import FailingEngine, services

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def serving() -> MessagesServing:
    from models.demo.build import demo_base_dir

    return MessagesServing(services(settings=SimpleNamespace(model_name="demo-base"),
                                    renderer=PromptRenderer.load(demo_base_dir())))


def request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "demo-base", "max_tokens": 8,
                                           "messages": [{"role": "user", "content": "45+67="}], **fields})


def test_a_message_runs_as_the_chat_request_vllm_makes_of_it(serving):
    body = request(
        system=[{"type": "text", "text": "be "}, {"type": "text", "text": "exact"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "45+"}, {"type": "text", "text": "67="}]},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                                     "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"},
                                               {"type": "text", "text": "and?"}]}],
        tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True}, stop_sequences=["\n"],
        temperature=0.5, top_k=5, stream=True, metadata={"user_id": "u"},
        guidance=[{"type": "qsharp", "model": "demo-value", "strength": 2.0}], max_kl=1.5, kl_per_token=0.2,
        cache=False, timeout_s=30)
    chat = serving.chat_request(body)
    assert [m.template_message() for m in chat.messages] == [
        {"role": "system", "content": "be exact"},
        {"role": "user", "content": "45+67="},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "Sunny"},
        {"role": "user", "content": "and?"},
    ]
    assert (chat.max_tokens, chat.stop, chat.temperature, chat.top_k) == (8, ["\n"], 0.5, 5)
    assert (chat.tool_choice, chat.parallel_tool_calls) == ("required", False)
    assert chat.tools[0].function.parameters == {**WEATHER["input_schema"], "type": "object"}
    assert chat.stream and chat.include_usage_in_stream and chat.return_token_ids
    assert (chat.guidance, chat.cache, chat.timeout_s) == (body.guidance, False, 30)
    assert (chat.max_kl, chat.kl_per_token) == (1.5, 0.2)


def test_tools_without_a_tool_choice_ask_for_auto(serving):
    assert serving.chat_request(request(tools=[WEATHER])).tool_choice == "auto"
    assert serving.chat_request(request()).tool_choice == "none"


def test_count_tokens_renders_the_prompt_of_the_message(serving):
    fields = {"system": "be exact", "messages": [{"role": "user", "content": "45+67="}]}
    count = serving.count_tokens(CountTokensRequest.model_validate({"model": "demo-base", **fields}))
    chat = serving.chat_request(request(**fields))
    prompt = serving.render(chat, chat.as_vllm_request())
    # <s><|system|>be exact<|user|>45+67=<|assistant|>: a token per character and four special tokens.
    assert count == {"input_tokens": len(prompt), "context_management": {"original_input_tokens": len(prompt)}}
    assert len(prompt) == len("be exact45+67=") + 4
    with pytest.raises(ModelNotFound):
        serving.count_tokens(CountTokensRequest.model_validate({"model": "other", **fields}))


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "messages[0].content[1]"),
    ({"system": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}, "system[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": "x"}, {"type": "image", "source": {}}]}]}]}, "messages[0].content[0].content[1]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]}]},
     "messages[0].content[0]"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048}, "thinking"),
])
def test_what_the_chat_path_cannot_do_is_a_400_naming_it(fields, param):
    with pytest.raises(InvalidRequest) as info:
        request(**fields)
    assert info.value.param == param


def test_thinking_disabled_or_adaptive_changes_nothing(serving):
    plain = serving.chat_request(request())
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}):
        assert serving.chat_request(request(thinking=thinking)).model_dump() == plain.model_dump()


@pytest.mark.parametrize("fields", [{"stop_sequences": [""]}, {"max_tokens": 0}, {"extra": 1}, {"n": 2}])
def test_invalid_fields_are_refused(serving, fields):
    with pytest.raises((ValidationError, InvalidRequest)):
        serving.chat_request(request(**fields))


VOCAB = {0: "4", 1: "5", 2: "\n\n", 3: "", 4: "5\n"}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


@pytest.mark.parametrize(("stops", "ids", "found"), [
    (["\n"], [0, 1, 2], "\n"),
    (["5\n", "\n"], [0, 1, 2], "5\n"),  # both end in the last token's first character: the first listed
    (["\n\n", "5\n"], [0, 1, 2], "5\n"),  # completed a character before "\n\n"
    (["4"], [0, 1, 2], None),  # completed before the last token: not what stopped it
    (["\n"], [0, 1, 3], None),  # the end-of-sequence token writes nothing
    (["5\n"], [0, 4], "5\n"),
    ([], [0, 1, 2], None),
])
def test_stop_sequence_is_the_one_the_last_token_completed_first(stops, ids, found):
    assert stop_sequence(stops, ids, decode) == found


def completion(reply: dict, finish_reason: str, **choice) -> dict:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "demo-base",
            "choices": [{"index": 0, "message": {"role": "assistant", **reply}, "logprobs": None,
                         "finish_reason": finish_reason, "token_ids": [1, 2], **choice}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}, "prompt_token_ids": [0] * 9}


def test_a_completion_is_a_message():
    assert message(completion({"content": "112"}, "stop"), None) == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "demo-base",
        "content": [{"type": "text", "text": "112"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 2}}
    assert message(completion({"content": "11"}, "stop"), "2")["stop_reason"] == "stop_sequence"
    assert message(completion({"content": "11"}, "stop"), "2")["stop_sequence"] == "2"
    assert message(completion({"content": "11"}, "length"), None)["stop_reason"] == "max_tokens"
    assert message(completion({"content": ""}, "stop"), None)["content"] == [{"type": "text", "text": ""}]


def test_tool_calls_are_tool_use_blocks():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    for finish_reason in ("tool_calls", "stop"):  # "stop": a named call
        result = message(completion({"content": "", "tool_calls": calls}, finish_reason), None)
        assert result["content"] == [{"type": "tool_use", "id": "c1", "name": "get_weather",
                                      "input": {"city": "Paris"}}]
        assert result["stop_reason"] == "tool_use"


def test_a_guided_message_reports_its_guidance_beside_usage():
    report = {"kl": 0.5, "steps": 2, "score": 1.0, "candidate_scores": [1.0, 0.0], "selected": 0,
              "generated_tokens": 4}
    chat = {**completion({"content": "112"}, "stop", guidance=report),
            "guidance": {"entries": [], "search": {"type": "best_of_n", "n": 2}}}
    assert message(chat, None)["guidance"] == {**report, "entries": [], "search": {"type": "best_of_n", "n": 2}}


def chunk(delta: dict, finish_reason: str | None = None, **choice) -> str:
    return sse({"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "demo-base",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                             **choice}]})


OPENING = sse({"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "demo-base",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}], "prompt_token_ids": [0] * 9})
USAGE = sse({"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "demo-base",
             "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})


def convert(chat_events: list[str], find_stop=lambda ids: None) -> list[tuple[str, dict]]:
    async def run() -> list[str]:
        async def source():
            for chat_event in chat_events:
                yield chat_event

        return [e async for e in MessageEvents(find_stop).convert(source())]

    events = []
    for text in asyncio.run(run()):
        name, data = text.removesuffix("\n\n").split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        events.append((payload.pop("type"), payload))
    return events


def test_a_chat_stream_is_a_message_stream():
    guidance = {"kl": 0.25, "steps": 3}
    events = convert([OPENING, chunk({"content": "4"}, token_ids=[0]), chunk({"content": "5"}, token_ids=[1]),
                      chunk({}, "stop", token_ids=[2], guidance=guidance), USAGE, SSE_DONE],
                     find_stop=lambda ids: "\n" if ids == [0, 1, 2] else None)
    assert events == [
        ("message_start", {"message": {"id": "msg_abc", "type": "message", "role": "assistant", "content": [],
                                       "model": "demo-base", "stop_reason": None, "stop_sequence": None,
                                       "usage": {"input_tokens": 9, "output_tokens": 0}}}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "4"}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "5"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "stop_sequence", "stop_sequence": "\n"},
                           "usage": {"input_tokens": 9, "output_tokens": 3}, "guidance": guidance}),
        ("message_stop", {}),
    ]


def test_streamed_tool_calls_are_tool_use_blocks():
    def call(**fragment):
        return chunk({"tool_calls": [{"index": 0, **fragment}]})

    events = convert([OPENING, chunk({"content": "Let me look."}),
                      call(id="c1", type="function", function={"name": "get_weather", "arguments": ""}),
                      call(function={"arguments": '{"city": '}), call(function={"arguments": '"Paris"}'}),
                      chunk({}, "tool_calls"), USAGE, SSE_DONE])
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[4][1] == {"index": 1, "content_block": {"type": "tool_use", "id": "c1", "name": "get_weather",
                                                          "input": {}}}
    assert "".join(e["delta"]["partial_json"] for _, e in events[5:7]) == '{"city": "Paris"}'
    assert events[8][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


def test_a_failure_mid_stream_ends_it_with_anthropics_error_event(serving):
    failing = MessagesServing(services(engine=FailingEngine(), renderer=serving.services.renderer))
    body = failing.chat_request(request(stream=True))
    prepared = ChatPrepared([PreparedPrompt([1, 2], "", SamplingOptions(max_tokens=4))])

    async def run():
        record = RequestTracker(stall_timeout_s=60).open("msg-1", "chat.completion", True, timeout_s=60)
        return [e async for e in failing.stream(body, prepared, None, record)]

    events = asyncio.run(run())
    assert [e.split("\n")[0] for e in events] == [
        "event: message_start", "event: content_block_start", "event: content_block_delta", "event: error"]
    assert json.loads(events[-1].split("\n")[1].removeprefix("data: ")) == {
        "type": "error", "error": {"type": "api_error", "message": "Internal server error."}}


@pytest.mark.parametrize(("error", "type_", "message"), [
    (InvalidRequest("Input should be greater than 0", param="guidance[0].strength"), "invalid_request_error",
     "guidance.0.strength: Input should be greater than 0"),
    (ModelNotFound("x"), "not_found_error", "model: The model `x` does not exist."),
    (AuthenticationFailed("no key"), "authentication_error", "no key"),
    (TooManyRequests("busy", retry_after_s=1), "rate_limit_error", "busy"),
])
def test_anthropic_error_envelope(error, type_, message):
    assert anthropic_error_body(error) == {"type": "error", "error": {"type": type_, "message": message}}


def test_x_api_key_and_the_envelope_on_the_messages_paths():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/messages")
    @app.post("/v1/chat/completions")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    app.add_middleware(ApiKeyAuth, keys=["k1"], open_paths=frozenset())
    client = TestClient(app)
    assert client.post("/v1/messages", headers={"x-api-key": "k1"}).status_code == 200
    assert client.post("/v1/messages", headers={"Authorization": "Bearer k1"}).status_code == 200
    refused = client.post("/v1/messages", headers={"x-api-key": "k2"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    # Elsewhere, the OpenAI API's Bearer key only, and its envelope.
    openai = client.post("/v1/chat/completions", headers={"x-api-key": "k1"})
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"
