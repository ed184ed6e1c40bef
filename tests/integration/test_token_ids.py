"""vLLM's `return_token_ids`, `return_tokens_as_token_ids` and request ids (`request_id`, X-Request-Id)
on the real server and engine (demo model): the ids match the text, streamed or not, searched, guided
or replayed from the cache, and the response id follows the client's while engine requests stay apart."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import httpx
import pytest
from transformers import AutoTokenizer

from models.demo.build import demo_base_dir

pytestmark = pytest.mark.engine

PROMPT = "123+456="  # the demo model answers 579 and stops
MESSAGES = [{"role": "user", "content": "45+67="}]
GUIDANCE = [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]
SEARCHES = {
    "best_of_n": {"type": "best_of_n", "n": 3, "scorer": "demo-reward"},
    "blockwise": {"type": "blockwise", "candidates": 2, "block_tokens": 2, "scorer": "demo-prefix"},
}
PLACEHOLDER = re.compile(r"token_id:(\d+)")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_base_dir())


def fresh_prompt() -> str:
    """A prompt no earlier request sent, so the response cache cannot answer it."""
    return f"{uuid.uuid4().int % 900 + 100}+{uuid.uuid4().int % 900 + 100}="


def post(http, path: str, body: dict, headers: dict | None = None) -> dict:
    response = http.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def stream(http, path: str, body: dict, headers: dict | None = None) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[len("data: "):]) for line in response.iter_lines()
                if line.startswith("data: {")]


def completion_body(model_name: str, **fields) -> dict:
    return {"model": model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
            **fields}


def chat_body(model_name: str, **fields) -> dict:
    return {"model": model_name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
            **fields}


def tokenize(http, prompt: str) -> list[int]:
    return post(http, "/tokenize", {"prompt": prompt})["tokens"]


def streamed_ids(chunks: list[dict]) -> dict[int, list[int]]:
    """Each choice's token ids, the concatenation of its chunks' `token_ids`."""
    ids: dict[int, list[int]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if "token_ids" in choice:
                ids.setdefault(choice["index"], []).extend(choice["token_ids"])
    return ids


def test_completion_ids_through_the_openai_client(openai_client, model_name, http, tokenizer):
    result = openai_client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, n=2,
                                              extra_body={"return_token_ids": True})
    for choice in result.choices:
        extra = choice.model_extra
        assert extra["prompt_token_ids"] == tokenize(http, PROMPT)
        assert tokenizer.decode(extra["token_ids"], skip_special_tokens=True) == choice.text == "579"
    assert sum(len(c.model_extra["token_ids"]) for c in result.choices) == result.usage.completion_tokens


def test_chat_ids_through_the_openai_client(openai_client, model_name, http, tokenizer):
    result = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                                   extra_body={"return_token_ids": True})
    templated = post(http, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": True})["tokens"]
    assert result.model_extra["prompt_token_ids"] == templated
    assert len(templated) == result.usage.prompt_tokens
    (choice,) = result.choices
    token_ids = choice.model_extra["token_ids"]
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == choice.message.content
    assert len(token_ids) == result.usage.completion_tokens


def test_without_the_field_no_ids_are_returned(http, model_name):
    completion = post(http, "/v1/completions", completion_body(model_name, return_token_ids=False))
    assert not {"token_ids", "prompt_token_ids"} & completion["choices"][0].keys()
    chat = post(http, "/v1/chat/completions", chat_body(model_name, return_token_ids=False))
    assert "prompt_token_ids" not in chat and "token_ids" not in chat["choices"][0]


def test_echo_with_token_ids_leaves_the_prompt_text_out_as_vllm_does(http, model_name):
    """vLLM's server: with `echo` and `return_token_ids` the prompt comes back as ids only (not in the
    text), while the echoed logprobs still start with the prompt's tokens."""
    echoed = post(http, "/v1/completions", completion_body(model_name, echo=True, logprobs=0))["choices"][0]
    assert echoed["text"] == "579" and echoed["prompt_token_ids"] == tokenize(http, PROMPT)
    assert echoed["logprobs"]["tokens"][:len(PROMPT) + 1] == ["<s>", *PROMPT]
    first = stream(http, "/v1/completions", completion_body(model_name, echo=True))[0]["choices"][0]
    assert not first["text"].startswith(PROMPT) and first["prompt_token_ids"] == echoed["prompt_token_ids"]
    plain = post(http, "/v1/completions", completion_body(model_name, echo=True, return_token_ids=False))
    assert plain["choices"][0]["text"] == PROMPT + "579"


@pytest.mark.parametrize("n", [1, 2])
def test_streamed_completion_ids_equal_the_whole_ones(http, model_name, n):
    body = completion_body(model_name, prompt=fresh_prompt(), n=n, temperature=1.0, seed=7, max_tokens=10,
                           ignore_eos=True, cache=False)
    whole = post(http, "/v1/completions", body)
    chunks = stream(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed_ids(chunks) == {c["index"]: c["token_ids"] for c in whole["choices"]}
    # vLLM's server sends each choice's prompt ids with its first chunk only.
    with_prompt = [(chunk["choices"][0]["index"], chunk["choices"][0]["prompt_token_ids"])
                   for chunk in chunks if chunk["choices"] and "prompt_token_ids" in chunk["choices"][0]]
    assert sorted(with_prompt) == [(i, tokenize(http, body["prompt"])) for i in range(n)]
    firsts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            firsts.setdefault(choice["index"], "prompt_token_ids" in choice)
    assert firsts == {i: True for i in range(n)}
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(ids) for ids in streamed_ids(chunks).values())


@pytest.mark.parametrize("n", [1, 2])
def test_streamed_chat_ids_equal_the_whole_ones(http, model_name, n):
    body = chat_body(model_name, n=n, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True, cache=False)
    whole = post(http, "/v1/chat/completions", body)
    chunks = stream(http, "/v1/chat/completions", body)
    assert streamed_ids(chunks) == {c["index"]: c["token_ids"] for c in whole["choices"]}
    # Beside the choices, in the opening (role) chunks only, as vLLM's server sends them.
    opening = [chunk for chunk in chunks if chunk["choices"][0]["delta"].get("role") == "assistant"]
    assert len(opening) == n and all(c["prompt_token_ids"] == whole["prompt_token_ids"] for c in opening)
    assert all("prompt_token_ids" not in chunk for chunk in chunks[n:])


@pytest.mark.parametrize("kind", ["best_of_n", "blockwise", "guided"])
def test_searched_and_guided_ids_match_their_text(http, model_name, tokenizer, kind):
    extension = {"guidance": GUIDANCE} if kind == "guided" else {"search": SEARCHES[kind]}
    body = completion_body(model_name, prompt=fresh_prompt(), temperature=1.0, seed=5, max_tokens=8, cache=False,
                           **extension)
    whole = post(http, "/v1/completions", body)
    (choice,) = whole["choices"]
    assert "guidance" in choice  # the extension ran
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"]
    assert choice["prompt_token_ids"] == tokenize(http, body["prompt"])
    assert streamed_ids(stream(http, "/v1/completions", body)) == {0: choice["token_ids"]}
    chat = post(http, "/v1/chat/completions", chat_body(model_name, temperature=1.0, seed=5, cache=False,
                                                        **extension))
    chat_ids = chat["choices"][0]["token_ids"]
    assert tokenizer.decode(chat_ids, skip_special_tokens=True) == chat["choices"][0]["message"]["content"]
    assert len(chat_ids) == chat["usage"]["completion_tokens"]


def cache_hits(server) -> float:
    return server.metric("alignserve_cache_requests_total", outcome="hit")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_cached_answer_carries_the_same_ids(server, http, model_name, path):
    fresh = [{"role": "user", "content": fresh_prompt()}]
    body = completion_body(model_name, prompt=fresh[0]["content"], n=2, seed=3, temperature=1.0) \
        if path == "/v1/completions" else chat_body(model_name, messages=fresh, n=2, seed=3, temperature=1.0)
    live = post(http, path, body)
    hits = cache_hits(server)
    cached = post(http, path, body, headers={"X-Request-Id": "replayed"})
    replayed = stream(http, path, body)
    assert cache_hits(server) == hits + 2, "both repeats were to be answered from the cache"
    assert cached["choices"] == live["choices"] and cached.get("prompt_token_ids") == live.get("prompt_token_ids")
    assert cached["id"] == ("cmpl-replayed" if path == "/v1/completions" else "chatcmpl-replayed") != live["id"]
    assert streamed_ids(replayed) == {c["index"]: c["token_ids"] for c in live["choices"]}
    if path == "/v1/completions":
        assert [c["choices"][0]["prompt_token_ids"] for c in replayed] == [c["prompt_token_ids"]
                                                                           for c in live["choices"]]
    else:
        assert [c["prompt_token_ids"] for c in replayed if "prompt_token_ids" in c] == [live["prompt_token_ids"]] * 2


def ids_of(names: list[str]) -> list[int]:
    ids = [PLACEHOLDER.fullmatch(name) for name in names]
    assert all(ids), names
    return [int(match.group(1)) for match in ids]


@pytest.mark.parametrize("stream_it", [False, True])
def test_completion_logprob_tokens_as_token_ids(http, model_name, stream_it):
    body = completion_body(model_name, logprobs=2, echo=True, return_tokens_as_token_ids=True, max_tokens=4,
                           ignore_eos=True, cache=False)
    whole = post(http, "/v1/completions", body)["choices"][0]
    logprobs = whole["logprobs"]
    assert ids_of(logprobs["tokens"]) == whole["prompt_token_ids"] + whole["token_ids"]
    assert logprobs["top_logprobs"][0] is None  # the first prompt token has no context
    for top in logprobs["top_logprobs"][1:]:
        assert ids_of(list(top))
    # Offsets still count characters of the text the tokens stand for (the BOS token stands for none).
    assert logprobs["text_offset"][:len(PROMPT) + 2] == [0, *range(len(PROMPT) + 1)]
    if stream_it:
        chunks = stream(http, "/v1/completions", body)
        names = [name for chunk in chunks for name in chunk["choices"][0]["logprobs"]["tokens"]]
        assert ids_of(names) == whole["prompt_token_ids"] + whole["token_ids"]
    plain = post(http, "/v1/completions", {**body, "return_tokens_as_token_ids": False})["choices"][0]["logprobs"]
    assert plain["tokens"][:len(PROMPT) + 1] == ["<s>", *PROMPT]


@pytest.mark.parametrize("stream_it", [False, True])
def test_chat_logprob_tokens_as_token_ids(http, model_name, tokenizer, stream_it):
    body = chat_body(model_name, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True, max_tokens=4,
                     ignore_eos=True, cache=False)
    whole = post(http, "/v1/chat/completions", body)["choices"][0]
    content = whole["logprobs"]["content"]
    assert ids_of([entry["token"] for entry in content]) == whole["token_ids"]
    for token_id, entry in zip(whole["token_ids"], content):
        # vLLM's server gives the generated token the bytes of its text, an alternative those of its name.
        assert entry["bytes"] == list(tokenizer.decode([token_id]).encode())
        assert len(entry["top_logprobs"]) == 2
        assert all(top["bytes"] == list(top["token"].encode()) for top in entry["top_logprobs"])
        assert ids_of([top["token"] for top in entry["top_logprobs"]])
    if stream_it:
        chunks = stream(http, "/v1/chat/completions", body)
        names = [entry["token"] for chunk in chunks if chunk["choices"][0]["logprobs"]
                 for entry in chunk["choices"][0]["logprobs"]["content"]]
        assert ids_of(names) == whole["token_ids"]


@pytest.mark.parametrize("path, prefix", [("/v1/completions", "cmpl-"), ("/v1/chat/completions", "chatcmpl-")])
def test_the_response_id_follows_the_clients(http, model_name, path, prefix):
    body = completion_body(model_name) if path == "/v1/completions" else chat_body(model_name)
    assert post(http, path, {**body, "request_id": "from-body"})["id"] == f"{prefix}from-body"
    assert post(http, path, body, headers={"X-Request-Id": "from-header"})["id"] == f"{prefix}from-header"
    both = post(http, path, {**body, "request_id": "from-body"}, headers={"X-Request-Id": "from-header"})
    assert both["id"] == f"{prefix}from-header"  # vLLM's server prefers the header
    chunks = stream(http, path, {**body, "request_id": "streamed"})
    assert {chunk["id"] for chunk in chunks} == {f"{prefix}streamed"}
    random_ids = {post(http, path, body)["id"] for _ in range(2)}
    assert len(random_ids) == 2 and all(i.startswith(prefix) for i in random_ids)


def test_the_openai_client_sends_request_id_in_extra_body(openai_client, model_name):
    result = openai_client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4,
                                              extra_body={"request_id": "sdk-1"})
    assert result.id == "cmpl-sdk-1"
    chat = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4,
                                                 extra_headers={"X-Request-Id": "sdk-2"})
    assert chat.id == "chatcmpl-sdk-2"


def test_concurrent_requests_with_one_client_id_both_run(server, model_name):
    """Engine request ids are the server's own: a client reusing its id gets two whole answers. (vLLM's
    engine aborts every request under an id, so a request finishing under a shared id would abort the other.)"""
    body = {"model": model_name, "prompt": PROMPT, "ignore_eos": True, "n": 2, "temperature": 1.0, "cache": False,
            "return_token_ids": True}

    async def run() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120,
                                     headers={"X-Request-Id": "same"}) as client:
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "max_tokens": 200, "stream": True}) as long:
                lines = long.aiter_lines()
                first = await anext(lines)  # the long request is generating
                short = await client.post("/v1/completions", json={**body, "max_tokens": 2})
                return short, [first, *[line async for line in lines]]

    short, lines = asyncio.run(run())
    assert short.status_code == 200, short.text
    assert short.json()["id"] == "cmpl-same"
    assert [len(c["token_ids"]) for c in short.json()["choices"]] == [2, 2]
    events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    assert {event["id"] for event in events} == {"cmpl-same"}
    assert {i: len(ids) for i, ids in streamed_ids(events).items()} == {0: 200, 1: 200}
    assert sorted(c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]) == ["length"] * 2
