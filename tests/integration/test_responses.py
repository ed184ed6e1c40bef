"""/v1/responses, retrieve and cancel through OpenAI's SDK against the real server and engine."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import metric_value

pytestmark = pytest.mark.engine

QSHARP = [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]
# Event types of a streamed plain-text response, as vLLM's server sends them (the deltas in between).
OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
           "response.completed"]


def streamed(client: openai.OpenAI, **kwargs) -> tuple[str, list]:
    """The text of a streamed response, and its events."""
    events = list(client.responses.create(stream=True, **kwargs))
    return "".join(e.delta for e in events if e.type == "response.output_text.delta"), events


def test_streamed_response_equals_the_whole_one(openai_client, model_name):
    # cache: false, so that the stream is generated, not replayed from the first answer.
    kwargs = dict(model=model_name, input="45+67=", max_output_tokens=8, temperature=0, extra_body={"cache": False})
    whole = openai_client.responses.create(**kwargs)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.status in ("completed", "incomplete")
    message = whole.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert whole.output_text and whole.max_output_tokens == 8 and whole.temperature == 0
    # <s><|user|>45+67=<|assistant|>: one token per character plus three special tokens.
    assert whole.usage.input_tokens == len("45+67=") + 3
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    text, events = streamed(openai_client, **kwargs)
    types = [e.type for e in events]
    assert types[:4] == OPENING and types[-4:] == CLOSING
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert text == whole.output_text == events[-4].text
    completed = events[-1].response
    assert events[0].response.status == "in_progress" and completed.status == whole.status
    assert completed.output_text == text and completed.usage.output_tokens == whole.usage.output_tokens
    assert completed.output[0].id == events[2].item.id


def test_max_output_tokens_makes_it_incomplete(openai_client, model_name):
    cut = openai_client.responses.create(model=model_name, input="45+67=", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 1


def test_instructions_and_messages_prompt_as_chat_does(openai_client, model_name):
    """Instructions are the system message, input messages follow: the same prompt and greedy reply as chat's."""
    chat = openai_client.chat.completions.create(
        model=model_name, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "be exact"}, {"role": "user", "content": "45+"},
                  {"role": "assistant", "content": "67"}, {"role": "user", "content": "="}])
    response = openai_client.responses.create(
        model=model_name, max_output_tokens=6, temperature=0, instructions="be exact",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "45+"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "67"}]},
               {"role": "user", "content": "="}])
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.output_text == chat.choices[0].message.content


def test_guidance_reports_its_kl(openai_client, model_name):
    kwargs = dict(model=model_name, input="45+67=", max_output_tokens=6, temperature=1.0,
                  extra_body={"guidance": QSHARP})
    report = openai_client.responses.create(**kwargs).model_extra["guidance"]
    assert report["steps"] > 0 and report["kl"] > 0
    assert [{key: entry[key] for key in QSHARP[0]} for entry in report["entries"]] == QSHARP
    _, events = streamed(openai_client, **kwargs)
    streamed_report = events[-1].response.model_extra["guidance"]
    assert streamed_report["steps"] > 0 and streamed_report["kl"] > 0 and streamed_report["entries"]
    assert "guidance" not in (events[0].response.model_extra or {})


def test_best_of_n_reports_candidate_scores(openai_client, model_name):
    search = {"type": "best_of_n", "n": 4, "scorer": "demo-arm"}
    kwargs = dict(model=model_name, input="45+67=", max_output_tokens=8, temperature=1.0,
                  extra_body={"search": search})
    report = openai_client.responses.create(**kwargs).model_extra["guidance"]
    assert len(report["candidate_scores"]) == 4 and report["score"] == max(report["candidate_scores"])
    assert report["search"]["n"] == 4
    _, events = streamed(openai_client, **kwargs)
    assert len(events[-1].response.model_extra["guidance"]["candidate_scores"]) == 4


def test_output_logprobs(openai_client, model_name):
    response = openai_client.responses.create(model=model_name, input="45+67=", max_output_tokens=4, temperature=0,
                                              include=["message.output_text.logprobs"], top_logprobs=2)
    logprobs = response.output[0].content[0].logprobs
    # Every generated token's, the end-of-sequence token's too (it writes no text).
    assert len(logprobs) == response.usage.output_tokens
    assert "".join(lp.token for lp in logprobs).startswith(response.output_text)
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)


def test_stored_response_is_retrieved_and_continued(openai_client, model_name):
    first = openai_client.responses.create(model=model_name, input="45+67=", max_output_tokens=4, temperature=0)
    retrieved = openai_client.responses.retrieve(first.id)
    assert retrieved.model_dump() == first.model_dump()
    # The next turn is prompted with the stored conversation, its reply, then the new input: as chat would.
    follow = openai_client.responses.create(model=model_name, input="1+1=", max_output_tokens=4, temperature=0,
                                            previous_response_id=first.id, instructions="be exact")
    chat = openai_client.chat.completions.create(
        model=model_name, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "be exact"}, {"role": "user", "content": "45+67="},
                  {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "1+1="}])
    assert follow.previous_response_id == first.id
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == chat.choices[0].message.content
    unstored = openai_client.responses.create(model=model_name, input="1+1=", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(unstored.id)


def test_a_streamed_response_is_stored_when_it_completes(openai_client, model_name):
    _, events = streamed(openai_client, model=model_name, input="7+8=", max_output_tokens=4)
    completed = events[-1].response
    assert openai_client.responses.retrieve(completed.id).output_text == completed.output_text


def test_cancel_answers_as_vllm_does_for_a_finished_response(http, openai_client, model_name):
    stored = openai_client.responses.create(model=model_name, input="1+1=", max_output_tokens=2)
    answer = http.post(f"/v1/responses/{stored.id}/cancel")
    assert answer.status_code == 400
    assert answer.json()["error"] == {"message": "Cannot cancel a synchronous response.",
                                      "type": "invalid_request_error", "param": "response_id", "code": None}
    missing = http.post("/v1/responses/resp_nope/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
    again = http.get(f"/v1/responses/{stored.id}", params={"stream": "true"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "stream"


BODY = {"model": "demo-base", "input": "45+67=", "max_output_tokens": 4}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"model": "demo-base"}, 400, "input"),
    ({**BODY, "model": "nope"}, 404, "model"),
    ({**BODY, "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({**BODY, "max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({**BODY, "temperature": 3}, 400, "temperature"),
    ({**BODY, "guidance": [{**QSHARP[0], "strength": -1}]}, 400, "guidance[0].strength"),
    ({**BODY, "search": {"type": "best_of_n", "n": 4, "scorer": "nope"}}, 400, "search.scorer"),
    ({**BODY, "guidanse": []}, 400, "guidanse"),
    ({**BODY, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
     400, "input[0].content[0]"),
    ({**BODY, "input": [{"role": "user", "content": "1"},
                        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}, 400, "input[1]"),
    ({**BODY, "input": [{"type": "reasoning", "summary": []}]}, 400, "input[0]"),
    ({**BODY, "input": [{"role": "robot", "content": "1"}]}, 400, "input[0].role"),
    ({**BODY, "tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
    ({**BODY, "tool_choice": "required"}, 400, "tool_choice"),
    ({**BODY, "background": True}, 400, "background"),
    ({**BODY, "reasoning": {"effort": "high"}}, 400, "reasoning"),
    ({**BODY, "include": ["file_search_call.results"]}, 400, "include[0]"),
    ({**BODY, "truncation": "auto"}, 400, "truncation"),
    ({**BODY, "prompt": {"id": "p"}}, 400, "prompt"),
    ({**BODY, "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({**BODY, "input": "7" * 5000}, 400, "input"),
])
def test_errors_use_openais_envelope_and_name_the_field(http, body, status, field):
    response = http.post("/v1/responses", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}
    assert "max_completion_tokens" not in error["message"] and "messages" not in error["message"]


def test_sdk_raises_for_an_unknown_model_and_a_failure_mid_stream(openai_client, server):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.responses.create(model="nope", input="1+1=")
    assert info.value.body["code"] == "model_not_found"
    # The deadline passes before the engine answers: after the opening events, OpenAI's error event.
    events = list(openai_client.responses.create(model="demo-base", input="45+67=", max_output_tokens=64, stream=True,
                                                 extra_body={"timeout_s": 0.001, "cache": False}))
    assert events[-1].type == "error" and events[-1].code == "deadline_exceeded"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_requests_are_counted_under_their_endpoint(http, server):
    def count() -> float:
        return metric_value(http.get("/metrics").text, "alignserve_requests_total", endpoint="responses",
                            outcome="success")

    before = count()
    assert http.post("/v1/responses", json=BODY).status_code == 200
    assert count() == before + 1
