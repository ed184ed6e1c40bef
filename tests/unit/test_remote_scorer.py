"""Remote scorers: guide-table entries, the requests sent in vLLM's pooling shapes, the scores read, and
failures mapped to errors naming the scorer (httpx's mock transport; a real server in the integration tests)."""

from __future__ import annotations

import json

import httpx
import pytest

from guidance.search.remote import (RemoteScorer, RemoteScorerConfig, ScorerBadResponse, ScorerTimedOut,
                                    ScorerUnreachable, load_remote_scorers, read_remote_entry)
from guidance.search.scorers import Completion, Conversation, ScorerCatalog
from guidance.catalog import GuideCatalog
from server.errors import BadGateway, ScorerTimeout, ScorerUnavailable
from server.search import _scorer_error

CANDIDATES = [Completion("801", (1,)), Completion("9", (2,)), Completion("", ())]


def scorer(handler, **entry) -> RemoteScorer:
    config = RemoteScorerConfig.model_validate({"url": "http://rm:8000", "model": "rm", "backoff_s": 0, **entry})
    return RemoteScorer("rm", config, transport=httpx.MockTransport(handler))


def classify_answer(scores: list[float], order=None) -> dict:
    order = range(len(scores)) if order is None else order
    return {"object": "list", "model": "rm", "data": [
        {"index": i, "label": "reward", "probs": [scores[i]], "num_classes": 1} for i in order]}


def test_completions_go_in_one_batched_classify_call_and_scores_follow_the_index():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url, json.loads(request.content)))
        return httpx.Response(200, json=classify_answer([0.5, -1.0, 2.0], order=[2, 0, 1]))

    assert scorer(handler).score("1+1=", [5, 6], CANDIDATES) == [0.5, -1.0, 2.0]
    assert sent == [(httpx.URL("http://rm:8000/classify"),
                     {"model": "rm", "input": ["1+1=801", "1+1=9", "1+1="], "add_special_tokens": False,
                      "use_activation": False})]


def test_pooling_reads_the_data_vector_at_score_index_and_may_ask_for_the_activation():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/pooling"
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"data": [{"index": i, "object": "pooling", "data": [0.1, 0.9 - i / 10]}
                                                  for i in range(3)]})

    remote = scorer(handler, api="pooling", score_index=1, use_activation=True)
    assert remote.score("p", [], CANDIDATES) == pytest.approx([0.9, 0.8, 0.7])
    assert bodies[0]["use_activation"] is True


def test_a_chat_conversation_is_sent_as_messages_one_request_per_candidate():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=classify_answer([float(len(body["messages"][-1]["content"]))]))

    conversation = Conversation(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}))
    assert scorer(handler).score("rendered", [], CANDIDATES, conversation=conversation) == [3.0, 1.0, 0.0]
    assert sorted(body["messages"][-1]["content"] for body in bodies) == ["", "801", "9"]
    assert all(body["messages"][:2] == list(conversation.messages) and "input" not in body for body in bodies)
    assert all(body["messages"][-1]["role"] == "assistant" for body in bodies)


def test_a_continued_final_message_gets_the_completion_appended():
    conversation = Conversation(({"role": "user", "content": "1+1?"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "It is "}]}),
                                continues_last=True)
    assert conversation.with_reply("2") == [{"role": "user", "content": "1+1?"},
                                            {"role": "assistant", "content": "It is 2"}]


def test_format_text_sends_the_rendered_prompt_even_for_a_chat_request():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=classify_answer([1.0, 2.0, 3.0]))

    conversation = Conversation(({"role": "user", "content": "1+1?"},))
    scorer(handler, format="text").score("<user>1+1?", [], CANDIDATES, conversation=conversation)
    assert [body["input"] for body in bodies] == [["<user>1+1?801", "<user>1+1?9", "<user>1+1?"]]


def test_format_token_ids_sends_prompt_and_completion_ids_in_one_call():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=classify_answer([1.0, 2.0, 3.0]))

    conversation = Conversation(({"role": "user", "content": "1+1?"},))
    scorer(handler, format="token_ids").score("1+1=", [5, 6], CANDIDATES, conversation=conversation)
    assert bodies == [{"model": "rm", "input": [[5, 6, 1], [5, 6, 2], [5, 6]], "use_activation": False}]


def test_connect_errors_and_5xx_are_retried_then_reported_unreachable_naming_scorer_and_url():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(503, text="loading")

    remote = scorer(handler, retries=2)
    with pytest.raises(ScorerUnreachable, match=r"'rm' at http://rm:8000/classify is unavailable: HTTP 503 "
                                                r"\(3 attempts\)"):
        remote.score("p", [], CANDIDATES)
    assert len(calls) == 3
    assert remote.attempts() == {"retried": 2, "unreachable": 1}


def test_a_retry_that_succeeds_gives_the_scores():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json=classify_answer([1.0, 2.0, 3.0]))

    remote = scorer(handler, retries=2)
    assert remote.score("p", [], CANDIDATES) == [1.0, 2.0, 3.0]
    assert remote.attempts() == {"retried": 2, "ok": 1}


def test_a_read_timeout_is_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("timed out")

    with pytest.raises(ScorerTimedOut, match="'rm' at http://rm:8000/classify did not answer within 2 s"):
        scorer(handler, retries=3, timeout_s=2).score("p", [], CANDIDATES)
    assert len(calls) == 1


@pytest.mark.parametrize("response", [
    httpx.Response(400, json={"error": {"message": "This model's maximum context length is 512"}}),
    httpx.Response(200, text="not json"),
    httpx.Response(200, json={"data": [{"index": 0, "probs": []}]}),
    httpx.Response(200, json=classify_answer([1.0, 2.0])),
])
def test_unusable_answers_are_bad_responses_and_not_retried(response):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return response

    with pytest.raises(ScorerBadResponse, match="'rm' at http://rm:8000/classify"):
        scorer(handler, retries=2).score("p", [], CANDIDATES)
    assert len(calls) == 1


def test_failures_map_to_api_errors_naming_the_scorer():
    unreachable = _scorer_error("rm", ScorerUnreachable("rm", "the scorer 'rm' at URL is unavailable"), 60)
    assert (type(unreachable), unreachable.status, unreachable.code) == (ScorerUnavailable, 503, "scorer_unavailable")
    bad = _scorer_error("rm", ScorerBadResponse("rm", "the scorer 'rm' at URL answered HTTP 400"), 60)
    assert (type(bad), bad.status, bad.code) == (BadGateway, 502, "scorer_bad_response")
    timed_out = _scorer_error("rm", ScorerTimedOut("rm", "the scorer 'rm' at URL did not answer"), 60)
    assert (type(timed_out), timed_out.status, timed_out.code) == (ScorerTimeout, 503, "scorer_timeout")
    ours = _scorer_error("rm", TimeoutError(), 5)
    assert isinstance(ours, ScorerTimeout) and "'rm' did not answer within 5 s" in ours.message
    assert all("'rm'" in error.message for error in (unreachable, bad, timed_out))


def test_the_api_key_is_read_from_the_named_variable_and_sent_as_bearer():
    config, key = read_remote_entry("rm", {"url": "https://rm.example", "api_key_env": "RM_KEY"}, {"RM_KEY": "s3"})
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=classify_answer([1.0]))

    remote = RemoteScorer("rm", config, key, transport=httpx.MockTransport(handler))
    remote.score("p", [], CANDIDATES[:1])
    assert seen == ["Bearer s3"]
    assert "s3" not in json.dumps(remote.describe()) and "s3" not in remote.identity()


@pytest.mark.parametrize("entry, message", [
    ({"url": "rm:8000"}, "rm.url: must be an http(s) URL with a host"),
    ({"url": "http://rm:8000/classify"}, "rm.url: must be the server's base URL without a path"),
    ({"url": "http://user:pw@rm:8000"}, "rm.url: must not hold credentials"),
    ({"url": "http://rm", "api": "score"}, "rm.api: Input should be 'classify' or 'pooling'"),
    ({"url": "http://rm", "timeout_s": 0}, "rm.timeout_s: Input should be greater than 0"),
    ({"url": "http://rm", "retries": -1}, "rm.retries: Input should be greater than or equal to 0"),
    ({"url": "http://rm", "api_key": "s3"}, "rm.api_key: Extra inputs are not permitted"),
    ({"api": "classify"}, "rm.url: Field required"),
    ({"url": "http://rm", "api_key_env": "RM_KEY"}, "rm.api_key_env: the environment variable RM_KEY is not set"),
])
def test_entries_are_validated_naming_the_field(entry, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_remote_entry("rm", entry, {})


def test_remote_scorers_join_the_catalog_listed_as_remote_with_their_host():
    remote = load_remote_scorers({"rm": {"url": "http://rm.internal:8000/", "model": "rm"}}, {})
    catalog = ScorerCatalog.load(GuideCatalog({}), remote=remote)
    assert "rm" in catalog and catalog["rm"].describe() == {
        "name": "rm", "kind": "remote", "host": "rm.internal:8000", "api": "classify", "model": "rm",
        "format": "messages"}
    assert "rm" not in catalog.prefix_names() and "rm" not in catalog.reference_names()
    with pytest.raises(ValueError, match="remote scorer 'demo-verifier' has the name of a verifier"):
        ScorerCatalog.load(GuideCatalog({}), remote=load_remote_scorers({"demo-verifier": {"url": "http://x"}}, {}))


def test_the_guide_table_splits_directories_from_url_entries(tmp_path):
    from models.demo.build import demo_base_dir
    from server.settings import Settings

    table = tmp_path / "guides.json"
    table.write_text(json.dumps({"my-value": "value", "rm": {"url": "http://rm:8000"}}))
    settings = Settings(model=demo_base_dir(), guide_models=table)
    assert settings.guide_model_paths() == {"my-value": (tmp_path / "value").resolve()}
    assert settings.remote_scorer_entries() == {"rm": {"url": "http://rm:8000"}}
    table.write_text(json.dumps({"rm": ["http://rm:8000"]}))
    with pytest.raises(ValueError, match="name -> directory"):
        settings.guide_table()
