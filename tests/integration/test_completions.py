"""/v1/completions through the real openai SDK against the real server and engine."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.engine

PROMPT = "123+456="


def stream_text(client, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """Texts and finish reasons per choice index, and the raw chunks, of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(client.completions.create(stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_greedy_is_deterministic_and_answers(openai_client, model_name):
    first = openai_client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=8)
    second = openai_client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=8)
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason == "stop"  # the demo model ends its answer with EOS
    assert first.object == "text_completion" and first.model == model_name
    assert first.usage.prompt_tokens == len(PROMPT) + 1  # one token per character, plus BOS
    assert first.usage.completion_tokens >= 1
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize("n", [1, 3])
def test_streamed_equals_non_streamed_for_same_seed(openai_client, model_name, n):
    kwargs = dict(model=model_name, prompt=PROMPT, temperature=1.0, max_tokens=12, seed=1234, n=n)
    whole = openai_client.completions.create(**kwargs)
    texts, reasons, _ = stream_text(openai_client, **kwargs)
    assert sorted(texts) == list(range(n))
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert reasons[choice.index] == choice.finish_reason


def test_seeded_sampling_differs_between_choices_and_repeats(openai_client, model_name):
    kwargs = dict(model=model_name, prompt="7+8=", temperature=2.0, max_tokens=10, seed=7, n=6,
                  extra_body={"ignore_eos": True})
    once = openai_client.completions.create(**kwargs)
    again = openai_client.completions.create(**kwargs)
    assert [c.text for c in once.choices] == [c.text for c in again.choices]
    assert len({c.text for c in once.choices}) > 1  # children get distinct seeds


def test_max_tokens_gives_length_finish(openai_client, model_name):
    result = openai_client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 3


def test_default_max_tokens_is_sixteen(openai_client, model_name):
    result = openai_client.completions.create(model=model_name, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 16


def test_stop_string_ends_choice_and_is_not_returned(openai_client, model_name):
    full = openai_client.completions.create(
        model=model_name, prompt=PROMPT, temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
    ).choices[0].text
    stop = full[2]
    result = openai_client.completions.create(
        model=model_name, prompt=PROMPT, temperature=0, max_tokens=8, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == full[: full.index(stop)]


def test_batch_of_prompts_indexes_choices_by_prompt_then_n(openai_client, model_name):
    prompts = ["1+1=", "20+22=", "300+300="]
    result = openai_client.completions.create(model=model_name, prompt=prompts, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in result.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = openai_client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=6)
        assert result.choices[2 * i].text == alone.choices[0].text == result.choices[2 * i + 1].text


def test_token_id_prompt_equals_text_prompt(openai_client, model_name, http):
    text = openai_client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=6)
    from transformers import AutoTokenizer

    from models.demo.build import demo_base_dir

    ids = AutoTokenizer.from_pretrained(demo_base_dir()).encode(PROMPT)
    by_ids = openai_client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_echo_prepends_prompt(openai_client, model_name):
    plain = openai_client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=6)
    echoed = openai_client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_logprobs_format_and_consistency(openai_client, model_name):
    result = openai_client.completions.create(
        model=model_name, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    # With ignore_eos the EOS token may be generated: logprobs name it, the text skips it.
    assert "".join(logprobs.tokens).replace("</s>", "") == result.choices[0].text
    text = result.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        assert token == "</s>" or text[offset:].startswith(token)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3
        assert logprob <= 0
        # Greedy picks the most likely token, so it heads the top list with the same logprob.
        best = max(top, key=top.get)
        assert best == token and math.isclose(top[token], logprob, abs_tol=1e-5)


def test_streamed_logprobs_match_non_streamed(openai_client, model_name):
    kwargs = dict(model=model_name, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=2)
    whole = openai_client.completions.create(**kwargs).choices[0].logprobs
    _, _, chunks = stream_text(openai_client, **kwargs)
    tokens, offsets = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset


def test_stream_include_usage_sends_final_usage_chunk(openai_client, model_name):
    _, _, chunks = stream_text(
        openai_client, model=model_name, prompt=PROMPT, max_tokens=4, n=2,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(PROMPT) + 1


def test_stream_ends_with_done(http, model_name):
    with http.stream("POST", "/v1/completions",
                     json={"model": model_name, "prompt": PROMPT, "max_tokens": 3, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
