"""Request models: bounds, defaults and the mapping to engine sampling options."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.chat.protocol import ChatCompletionRequest
from server.api.common import completion_budget
from server.api.completions.protocol import CompletionRequest
from server.engine import SamplingOptions
from server.errors import ContextLengthExceeded

USER = [{"role": "user", "content": "1+1="}]


def test_completion_defaults_follow_openai():
    request = CompletionRequest(model="m", prompt="1+1=")
    assert request.max_tokens == 16
    assert request.sampling_options(16, None) == SamplingOptions(max_tokens=16)


def test_sampling_options_carry_every_field():
    request = CompletionRequest(
        model="m", prompt="x", n=3, temperature=0.5, top_p=0.9, top_k=5, stop="##", seed=11,
        presence_penalty=0.1, frequency_penalty=-0.2, logprobs=2, ignore_eos=True,
    )
    options = request.sampling_options(7, request.logprobs)
    assert options == SamplingOptions(
        max_tokens=7, n=3, temperature=0.5, top_p=0.9, top_k=5, stop=("##",), seed=11,
        presence_penalty=0.1, frequency_penalty=-0.2, logprobs=2, ignore_eos=True,
    )
    params = options.child_params(2, key="k")
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (1, 0.5, 0.9, 5, 7)
    assert params.stop == ["##"] and params.seed == 13 and params.logprobs == 2 and params.ignore_eos
    assert params.extra_args is None


@pytest.mark.parametrize(
    ("prompt", "batch"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_prompt_batches(prompt, batch):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == batch


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": -0.1}, {"temperature": 2.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"n": 0},
        {"top_k": 0}, {"top_k": -2}, {"stop": ["a"] * 17}, {"logprobs": -1}, {"max_tokens": 0},
        {"stream_options": {"include_usage": True}}, {"best_of": 3}, {"suffix": "x"},
    ],
)
def test_completion_rejects(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})


def test_chat_limits_and_logprobs():
    request = ChatCompletionRequest(model="m", messages=USER, max_tokens=9, max_completion_tokens=3)
    assert request.completion_limit == (3, "max_completion_tokens")
    assert ChatCompletionRequest(model="m", messages=USER, max_tokens=9).completion_limit == (9, "max_tokens")
    assert ChatCompletionRequest(model="m", messages=USER).num_logprobs is None
    assert ChatCompletionRequest(model="m", messages=USER, logprobs=True).num_logprobs == 0
    assert ChatCompletionRequest(model="m", messages=USER, logprobs=True, top_logprobs=4).num_logprobs == 4
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=USER, top_logprobs=4)


def test_chat_messages_render_as_template_input():
    request = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "1="}]},
    ])
    assert [m.template_message() for m in request.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]


def test_completion_budget():
    assert completion_budget(10, None, 512, prompt_param="prompt", max_tokens_param="max_tokens") == 502
    assert completion_budget(10, 502, 512, prompt_param="prompt", max_tokens_param="max_tokens") == 502
    with pytest.raises(ContextLengthExceeded) as info:
        completion_budget(10, 503, 512, prompt_param="prompt", max_tokens_param="max_tokens")
    assert info.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as info:
        completion_budget(512, None, 512, prompt_param="messages", max_tokens_param="max_tokens")
    assert info.value.param == "messages"
