"""Schemathesis against the app's own /openapi.json: no 5xx, every error in the OpenAI envelope."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.engine

ENDPOINTS = r"^/(v1/(completions|chat/completions|models|guidance)|tokenize|detokenize|version)"


def test_api_never_fails_and_errors_use_the_envelope(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json").include(path_regex=ENDPOINTS)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            response = case.call(timeout=120)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()


# Every string JSON allows, including what tokenizers and encoders choke on: lone surrogates
# (JSON escapes them as "\ud800"), NUL and control characters, and one very long token.
JSON_STRINGS = (st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=24)
                | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\x00" * 8, "9" * 4000, "\u200b\ufeff"]))
BASE = {"model": "demo-base", "max_tokens": 2, "temperature": 0}
CHAT = {**BASE, "messages": [{"role": "user", "content": "1+1="}]}
STRING_FIELDS = [
    ("/v1/completions", lambda s: {**BASE, "prompt": s}),
    ("/v1/completions", lambda s: {**BASE, "prompt": ["1", s]}),
    ("/v1/completions", lambda s: {**BASE, "prompt": "1", "stop": s}),
    ("/v1/completions", lambda s: {**BASE, "prompt": "1", "bad_words": [s]}),
    ("/v1/completions", lambda s: {**BASE, "prompt": "1", "logit_bias": {s: 1}}),
    ("/v1/completions", lambda s: {**BASE, "prompt": "1", "structured_outputs": {"regex": s}}),
    ("/v1/completions", lambda s: {**BASE, "prompt": "1", "structured_outputs": {"choice": [s]}}),
    ("/v1/chat/completions", lambda s: {**BASE, "messages": [{"role": "user", "content": s}]}),
    ("/v1/chat/completions", lambda s: {**CHAT, "user": s, "metadata": {s: s}}),
    ("/v1/chat/completions", lambda s: {**CHAT, "messages": [{"role": "system", "name": s, "content": "x"},
                                                             {"role": "user", "content": "1"}]}),
    ("/v1/chat/completions", lambda s: {**CHAT, "tools": [{"type": "function", "function": {"name": s}}]}),
    ("/v1/chat/completions", lambda s: {**CHAT, "chat_template_kwargs": {s: s}}),
    ("/v1/chat/completions", lambda s: {**CHAT, "guidance": [{"type": s, "model": s, "strength": 1}]}),
    ("/v1/messages", lambda s: {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}],
                                "system": s, "stop_sequences": [s]}),
    ("/v1/messages", lambda s: {**CHAT, "tools": [{"name": s, "input_schema": {s: s}}], "tool_choice": {"type": "none"}}),
    ("/v1/messages/count_tokens", lambda s: {"model": "demo-base", "messages": [{"role": "user", "content": s}]}),
    ("/v1/responses", lambda s: {"model": "demo-base", "max_output_tokens": 2, "temperature": 0, "input": s,
                                 "instructions": s}),
    ("/v1/responses", lambda s: {"model": "demo-base", "max_output_tokens": 2, "temperature": 0, "stop": [s],
                                 "input": [{"role": "user", "content": [{"type": "input_text", "text": s}]}],
                                 "metadata": {s: s}}),
    ("/tokenize", lambda s: {"prompt": s}),
    ("/tokenize", lambda s: {"messages": [{"role": "user", "content": s}]}),
]


@given(field=st.sampled_from(STRING_FIELDS), text=JSON_STRINGS)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_json_string_is_a_200_or_a_400(server, field, text):
    path, body = field
    # ensure_ascii writes lone surrogates as \ud800 escapes, exactly as a JSON client sends them.
    response = httpx.post(f"{server.base_url}{path}", content=json.dumps(body(text)),
                          headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code in (200, 400), (path, text, response.text[:500])
    if response.status_code == 400:
        assert response.json()["error"]["message"]
