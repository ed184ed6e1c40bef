"""Parity with vLLM's OpenAI server on the real server and engine (demo model): vLLM's sampling
fields take effect, OpenAI fields that change nothing are accepted, echo scores the prompt,
structured outputs compose with guidance, /version /tokenize /detokenize, and bad input is a 400."""

from __future__ import annotations

import json
import math
import re

import pytest

pytestmark = pytest.mark.engine

PROMPT = "123+456="  # the demo model answers 579 and stops
GREEDY = {"model": "demo-base", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}


def complete(http, **fields) -> dict:
    response = http.post("/v1/completions", json={**GREEDY, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def token_id(http, text: str) -> int:
    (token,) = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return token


def test_the_plain_greedy_answer(http):
    choice = complete(http)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("579", "stop")


@pytest.mark.parametrize(("fields", "text", "finish_reason"), [
    ({"bad_words": ["5"]}, "679", "stop"),
    ({"min_tokens": 6}, "579043", "length"),  # EOS is masked until 6 tokens
    ({"stop": ["9"], "include_stop_str_in_output": True}, "579", "stop"),
    ({"temperature": 1.0, "min_p": 1.0, "seed": 3}, "579", "stop"),  # min_p 1 keeps only the argmax
    ({"repetition_penalty": 1.5}, "579", "stop"),
])
def test_vllm_sampling_fields_take_effect(http, fields, text, finish_reason):
    choice = complete(http, **fields)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, finish_reason)


def test_token_id_fields_take_effect(http):
    eight, nine, six = token_id(http, "8"), token_id(http, "9"), token_id(http, "6")
    biased = complete(http, logit_bias={str(eight): 100}, ignore_eos=True)["choices"][0]
    assert biased["text"] == "888888"
    stopped = complete(http, stop_token_ids=[nine])["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == ("57", "stop")
    allowed = complete(http, allowed_token_ids=[six], max_tokens=3)["choices"][0]
    assert allowed["text"] == "666"


def test_fields_that_change_nothing_are_accepted_and_ignored(http):
    ignored = {"metadata": {"team": "a"}, "store": False, "service_tier": "auto", "user": "u-1",
               "safety_identifier": "s", "prompt_cache_key": "k"}
    assert complete(http, **ignored)["choices"][0]["text"] == "579"
    chat = http.post("/v1/chat/completions", json={
        "model": "demo-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0,
        "parallel_tool_calls": False, **ignored})
    assert chat.status_code == 200, chat.text


def test_echo_with_max_tokens_0_scores_the_prompt(http):
    """lm-eval's loglikelihood request: the prompt's token logprobs, nothing generated. Each prompt
    token's logprob equals the logprob of generating that token after the tokens before it."""
    scored = complete(http, prompt=PROMPT + "579", echo=True, logprobs=1, max_tokens=0)
    choice = scored["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT + "579" and scored["usage"]["completion_tokens"] == 0
    assert logprobs["tokens"] == ["<s>", *PROMPT, "5", "7", "9"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == [0, *range(len(PROMPT + "579"))]
    generated = complete(http, logprobs=1, max_tokens=3)["choices"][0]["logprobs"]
    assert generated["tokens"] == ["5", "7", "9"]
    assert logprobs["token_logprobs"][-3:] == pytest.approx(generated["token_logprobs"], abs=1e-4)
    for top in logprobs["top_logprobs"][1:]:  # the prompt token and the top-1 alternative
        assert 1 <= len(top) <= 2


def test_echo_streamed_sends_the_prompt_and_its_logprobs_first(http):
    with http.stream("POST", "/v1/completions", json={**GREEDY, "echo": True, "logprobs": 0, "stream": True}) as r:
        chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(PROMPT)
    assert first["logprobs"]["tokens"][:len(PROMPT) + 1] == ["<s>", *PROMPT]
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + "579"


def test_prompt_logprobs_as_vllm_returns_them(http):
    choice = complete(http, prompt_logprobs=2)["choices"][0]
    positions = choice["prompt_logprobs"]
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert len(positions) == len(ids) and positions[0] is None
    for token, position in zip(ids[1:], positions[1:]):
        assert str(token) in position and all(math.isfinite(e["logprob"]) for e in position.values())


def test_truncate_prompt_tokens_keeps_the_last_tokens(http):
    kept = complete(http, prompt="999+" + PROMPT, truncate_prompt_tokens=len(PROMPT), echo=True)
    # The last tokens, without the BOS the model was trained with: the answer may differ.
    assert kept["usage"]["prompt_tokens"] == len(PROMPT) and kept["choices"][0]["text"].startswith(PROMPT)
    chat = http.post("/v1/chat/completions", json={
        "model": "demo-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
        "truncate_prompt_tokens": 4})
    assert chat.json()["usage"]["prompt_tokens"] == 4
    empty = http.post("/v1/completions", json={**GREEDY, "truncate_prompt_tokens": 0})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "truncate_prompt_tokens"


def test_max_tokens_0_without_echo_is_a_400(http):
    response = http.post("/v1/completions", json={**GREEDY, "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_structured_output_composes_with_guidance(http):
    """The grammar allows the tokens, guidance reweights the allowed ones; KL is finite."""
    guidance = [{"type": "qsharp", "model": "demo-value", "strength": 4.0}]
    regex = complete(http, max_tokens=12, structured_outputs={"regex": r"\{\"sum\": [0-9]{3}\}"}, guidance=guidance)
    choice = regex["choices"][0]
    assert json.loads(choice["text"])["sum"] >= 100
    assert math.isfinite(choice["guidance"]["kl"]) and choice["guidance"]["steps"] > 0
    picked = complete(http, structured_outputs={"choice": ["578", "579", "580"]}, temperature=1.0, seed=5,
                      guidance=guidance)["choices"][0]
    assert picked["text"] in ("578", "579", "580") and math.isfinite(picked["guidance"]["kl"])
    chat = http.post("/v1/chat/completions", json={
        "model": "demo-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
        "temperature": 0.8, "seed": 1, "guidance": guidance,
        "structured_outputs": {"regex": "[0-9]{2,3}"}}).json()["choices"][0]
    assert re.fullmatch("[0-9]{2,3}", chat["message"]["content"]) and math.isfinite(chat["guidance"]["kl"])


def test_chat_template_fields(http):
    messages = [{"role": "user", "content": PROMPT}]
    opened = http.post("/tokenize", json={"messages": messages}).json()
    closed = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert opened["count"] == closed["count"] + 1  # the demo template opens the turn with one token
    continued = http.post("/v1/chat/completions", json={
        "model": "demo-base", "max_tokens": 4, "temperature": 0, "add_generation_prompt": False,
        "continue_final_message": True,
        "messages": [*messages, {"role": "assistant", "content": "5"}]})
    assert continued.status_code == 200, continued.text
    assert continued.json()["choices"][0]["message"]["content"] == "79"


def test_version_tokenize_detokenize(http):
    assert set(http.get("/version").json()) == {"version", "vllm_version"}
    tokenized = http.post("/tokenize", json={"model": "demo-base", "prompt": PROMPT, "return_token_strs": True}).json()
    assert tokenized["count"] == len(PROMPT) + 1 and tokenized["max_model_len"] > 0
    assert tokenized["token_strs"] == ["<s>", *PROMPT]
    detokenized = http.post("/detokenize", json={"model": "demo-base", "tokens": tokenized["tokens"]}).json()
    assert detokenized == {"prompt": "<s>" + PROMPT}
    assert http.post("/detokenize", json={"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize(("path", "fields", "param", "words"), [
    ("/v1/completions", {"logit_bias": {"999999": 1}}, "logit_bias", "out-of-vocab"),
    ("/v1/completions", {"allowed_token_ids": [999999]}, "allowed_token_ids", "out-of-vocab"),
    ("/v1/completions", {"stop_token_ids": [999999]}, "stop_token_ids", "out-of-vocab"),
    ("/v1/completions", {"structured_outputs": {"regex": "[0-9"}}, None, "regex"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, None, "one kind"),
    ("/v1/completions", {"temperature": float("nan")}, "temperature", "finite"),
    ("/v1/completions", {"guidance": [{"type": "qsharp", "model": "demo-value", "strength": float("nan")}]},
     "guidance[0].strength", "finite"),
    ("/v1/completions", {"prompt": "1\ud800"}, "prompt", "surrogate"),
    ("/v1/completions", {"stop": ["ok", "\udfff"]}, "stop[1]", "surrogate"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "tool_choice", "--tool-call-parser"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", "tools"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
     "add_generation_prompt"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message", "assistant"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "tool_call_id"),
])
def test_what_vllm_refuses_is_a_400_naming_the_field(http, path, fields, param, words):
    base = GREEDY if path == "/v1/completions" else {
        "model": "demo-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    # json.dumps writes NaN and lone surrogates as JSON allows ("\ud800" escapes).
    body = json.dumps({**base, **fields})
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("search", [{"type": "best_of_n", "n": 3, "scorer": "demo-reward"},
                                    {"type": "blockwise", "candidates": 2, "block_tokens": 2, "scorer": "demo-prefix"}])
def test_echo_logprobs_of_a_searched_request(http, search):
    plain = complete(http, echo=True, logprobs=0, max_tokens=1)["choices"][0]["logprobs"]
    searched = complete(http, echo=True, logprobs=0, search=search)["choices"][0]["logprobs"]
    prompt_tokens = len(PROMPT) + 1
    assert searched["tokens"][:prompt_tokens] == plain["tokens"][:prompt_tokens]
    assert searched["token_logprobs"][:prompt_tokens] == pytest.approx(plain["token_logprobs"][:prompt_tokens],
                                                                      abs=1e-4)
