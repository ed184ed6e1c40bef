"""/v1/chat/completions through the real openai SDK against the real server and engine."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "45+67="}]


def test_chat_greedy_is_deterministic(openai_client, model_name):
    first = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0)
    second = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "stop"
    assert first.object == "chat.completion"
    # <s><|user|>45+67=<|assistant|>: one token per character plus three special tokens.
    assert first.usage.prompt_tokens == len("45+67=") + 3


def test_chat_and_completion_agree_on_same_tokens(openai_client, model_name):
    """The chat template's rendering, sent as token ids to /v1/completions, gives the same greedy answer."""
    from transformers import AutoTokenizer

    from models.demo.build import demo_base_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    chat = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=8)
    completion = openai_client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=8)
    assert chat.choices[0].message.content == completion.choices[0].text


@pytest.mark.parametrize("n", [1, 2])
def test_chat_streamed_equals_non_streamed_for_same_seed(openai_client, model_name, n):
    kwargs = dict(model=model_name, messages=MESSAGES, temperature=1.0, max_completion_tokens=10, seed=99, n=n)
    whole = openai_client.chat.completions.create(**kwargs)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    roles: dict[int, str] = {}
    for chunk in openai_client.chat.completions.create(stream=True, **kwargs):
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert roles == {i: "assistant" for i in range(n)}
    for choice in whole.choices:
        assert texts[choice.index] == choice.message.content
        assert reasons[choice.index] == choice.finish_reason


def test_max_completion_tokens_and_max_tokens(openai_client, model_name):
    for field in ("max_completion_tokens", "max_tokens"):
        result = openai_client.chat.completions.create(
            model=model_name, messages=MESSAGES, extra_body={"ignore_eos": True}, **{field: 4}
        )
        assert result.usage.completion_tokens == 4
        assert result.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(openai_client, model_name):
    result = openai_client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=9, max_completion_tokens=3, extra_body={"ignore_eos": True}
    )
    assert result.usage.completion_tokens == 3


def test_chat_logprobs_format(openai_client, model_name):
    result = openai_client.chat.completions.create(
        model=model_name, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = result.choices[0].logprobs.content
    # With ignore_eos the EOS token may be generated: logprobs name it, the text skips it.
    assert "".join(entry.token for entry in content).replace("</s>", "") == result.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_chat_without_logprobs_has_none(openai_client, model_name):
    result = openai_client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2)
    assert result.choices[0].logprobs is None


def test_system_and_content_parts(openai_client, model_name):
    parts = [{"role": "system", "content": "be exact"},
             {"role": "user", "content": [{"type": "text", "text": "45+"}, {"type": "text", "text": "67="}]}]
    joined = [{"role": "system", "content": "be exact"}, {"role": "user", "content": "45+67="}]
    a = openai_client.chat.completions.create(model=model_name, messages=parts, temperature=0, max_tokens=6)
    b = openai_client.chat.completions.create(model=model_name, messages=joined, temperature=0, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_stream_include_usage(openai_client, model_name):
    chunks = list(openai_client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
