"""OpenAI's Responses API without the engine: a request as the conversation and chat request it runs
as, a chat completion as a response, a chat stream as the Responses event stream, and the store."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.api.chat.protocol import ChatCompletionRequest
from server.api.responses.convert import Turn, chat_fields, completion_response, conversation, responses_param
from server.api.responses.events import ResponseEvents
from server.api.responses.protocol import ResponsesRequest
from server.api.responses.serving import cancel, name_responses_field, retrieve
from server.api.responses.store import ResponseStore, StoredResponse
from server.api.streaming import SSE_DONE, sse
from server.errors import ContextLengthExceeded, InvalidRequest, ResponseNotFound


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "demo-base", "input": "1+1=", **fields})


def turn(body: ResponsesRequest, previous: StoredResponse | None = None, response_id: str = "resp_1") -> Turn:
    vllm_request = body.as_vllm_request(response_id)
    return Turn(vllm_request, conversation(vllm_request, previous), "demo-base", 0, max_tokens=8)


def stored(response_id: str, text: str, conversation_: list[dict]) -> StoredResponse:
    output = [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return StoredResponse({"id": response_id, "output": output}, conversation_)


def test_instructions_then_previous_conversation_and_output_then_input():
    previous = stored("resp_0", "2", [{"role": "system", "content": "old"}, {"role": "user", "content": "1+1="}])
    body = request(input=[{"role": "user", "content": [{"type": "input_text", "text": "2+2="}]}],
                   instructions="be exact", previous_response_id="resp_0")
    fields = chat_fields(body, turn(body, previous).request, turn(body, previous).conversation, "demo-base")
    chat = ChatCompletionRequest.model_validate(fields)
    # The previous instructions do not carry over (OpenAI's rule, as vLLM applies it).
    assert [m.template_message() for m in chat.messages] == [
        {"role": "system", "content": "be exact"}, {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2="}]
    assert chat.add_generation_prompt and not chat.continue_final_message


def test_sampling_budget_logprobs_and_format_reach_the_chat_request():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = request(max_output_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop=["\n"], stream=True,
                   include=["message.output_text.logprobs"], top_logprobs=2,
                   text={"format": {"type": "json_schema", "name": "a", "schema": schema}},
                   guidance=[{"type": "qsharp", "model": "demo-value", "strength": 1.0}], max_kl=1.5,
                   kl_per_token=0.2, timeout_s=5)
    made = turn(body)
    chat = ChatCompletionRequest.model_validate(chat_fields(body, made.request, made.conversation, "demo-base"))
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.seed, chat.stop) == (5, 0.5, 0.9, 3, ["\n"])
    assert (chat.logprobs, chat.top_logprobs, chat.stream, chat.include_usage_in_stream) == (True, 2, True, True)
    assert chat.structured_outputs.json == schema and chat.guidance == body.guidance and chat.timeout_s == 5
    assert (chat.max_kl, chat.kl_per_token) == (1.5, 0.2)


def test_a_partial_assistant_message_is_continued():
    body = request(input=[{"role": "user", "content": "1+1="},
                          {"role": "assistant", "content": [{"type": "output_text", "text": "2"}],
                           "status": "incomplete"}])
    made = turn(body)
    fields = chat_fields(body, made.request, made.conversation, "demo-base")
    assert fields["continue_final_message"] and not fields["add_generation_prompt"]
    assert fields["messages"][-1] == {"role": "assistant", "content": "2"}


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs", "reasoning.encrypted_content"]}, "include[1]"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
])
def test_what_the_chat_path_cannot_do_is_refused_where_asked(fields, param):
    with pytest.raises(InvalidRequest) as info:
        request(**fields)
    assert info.value.param == param


def test_chat_field_names_in_errors_become_the_responses_fields():
    assert [responses_param(p) for p in ("messages[3].content", "max_completion_tokens", "seed", None)] == [
        "input", "max_output_tokens", "seed", None]
    error = ContextLengthExceeded("Please reduce the prompt or max_completion_tokens.", param="max_completion_tokens")
    name_responses_field(error)
    assert (error.param, error.message) == ("max_output_tokens", "Please reduce the prompt or max_output_tokens.")


def completion(text: str, finish_reason: str, guided: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    result = {"id": "chatcmpl-1", "model": "demo-base", "choices": [choice],
              "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    if guided:
        choice["guidance"] = {"kl": 0.5, "steps": 3}
        result["guidance"] = {"entries": [{"type": "qsharp"}]}
    return result


def test_a_chat_completion_as_a_response():
    made = turn(request(max_output_tokens=8))
    whole = completion_response(made, completion("42", "stop", guided=True)).model_dump(mode="json")
    assert (whole["id"], whole["status"], whole["max_output_tokens"]) == ("resp_1", "completed", 8)
    assert whole["output"][0]["content"][0]["text"] == "42"
    assert (whole["usage"]["input_tokens"], whole["usage"]["output_tokens"]) == (7, 3)
    assert whole["guidance"] == {"kl": 0.5, "steps": 3, "entries": [{"type": "qsharp"}]}
    cut = completion_response(made, completion("", "length", guided=False)).model_dump(mode="json")
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["content"] == [] and "guidance" not in cut


def chat_stream(texts: list[str], fail: bool = False) -> list[str]:
    opening = {"id": "c", "model": "demo-base", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                             "logprobs": None, "finish_reason": None}]}
    chunks = [sse(opening)]
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": "stop" if last else None}
        if last:
            choice["guidance"] = {"kl": 0.25, "steps": len(texts)}
        chunks.append(sse({"id": "c", "model": "demo-base", "choices": [choice]}))
    if fail:
        chunks.append(sse({"error": {"message": "late", "type": "service_unavailable", "param": None,
                                     "code": "deadline_exceeded"}}))
    else:
        chunks.append(sse({"id": "c", "model": "demo-base", "choices": [],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}))
    return [*chunks, SSE_DONE]


def converted(chunks: list[str], summary: dict | None, finished: list) -> list[tuple[str, dict]]:
    async def source():
        for chunk in chunks:
            yield chunk

    async def collect() -> list[str]:
        events = ResponseEvents(turn(request(stream=True)), summary, finished.append)
        return [e async for e in events.convert(source())]

    result = []
    for text in asyncio.run(collect()):
        name, data = text.removesuffix("\n\n").split("\n")
        result.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return result


def test_a_chat_stream_as_the_responses_events():
    finished: list = []
    events = converted(chat_stream(["4", "2"]), {"entries": [{"type": "qsharp"}]}, finished)
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(10))
    assert [data["delta"] for name, data in events if name == "response.output_text.delta"] == ["4", "2"]
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "42"
    assert final["usage"]["output_tokens"] == 2
    assert final["guidance"] == {"kl": 0.25, "steps": 2, "entries": [{"type": "qsharp"}]}
    assert finished[0].model_dump(mode="json")["output"] == final["output"]


def test_a_failure_mid_stream_ends_with_the_error_event():
    finished: list = []
    events = converted(chat_stream(["4"], fail=True), None, finished)
    name, error = events[-1]
    assert name == "error" and (error["code"], error["message"]) == ("deadline_exceeded", "late")
    assert error["sequence_number"] == len(events) - 1 and not finished
    assert "response.completed" not in [n for n, _ in events]


def test_the_store_keeps_the_newest_and_answers_retrieve_and_cancel():
    store = ResponseStore(max_entries=2)
    for i in range(3):
        store.put(stored(f"resp_{i}", str(i), []))
    assert len(store) == 2 and store.get("resp_0") is None
    assert retrieve(store, "resp_2", stream=False)["id"] == "resp_2"
    with pytest.raises(InvalidRequest) as info:
        retrieve(store, "resp_2", stream=True)
    assert info.value.param == "stream"
    with pytest.raises(InvalidRequest) as info:
        cancel(store, "resp_1")
    assert (info.value.message, info.value.param) == ("Cannot cancel a synchronous response.", "response_id")
    with pytest.raises(ResponseNotFound):
        cancel(store, "resp_0")
    off = ResponseStore(max_entries=0)
    off.put(stored("resp_9", "9", []))
    assert not off.enabled and off.get("resp_9") is None
