"""Response-cache keys, backends (memory and a real redis-server) and cacheability."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from guidance.catalog import GuideCatalog, GuideModelInfo
from guidance.search.spec import SearchLimits, SearchParams, parse_search
from guidance.spec import parse_guidance
from server.api.chat.protocol import ChatCompletionRequest
from server.api.completions.protocol import CompletionRequest
from server.cache.backends import MemoryBackend, RedisBackend
from server.cache.keys import cache_key, model_revision
from server.cache.service import ResponseCache
from tests.redis_server import RedisServer

CATALOG = GuideCatalog({
    "v": GuideModelInfo("v", Path("/v"), "bernoulli", "q", 100),
    "w": GuideModelInfo("w", Path("/w"), "bernoulli", "q", 100),
    "e": GuideModelInfo("e", Path("/e"), "lm", "q", 100),
    "r": GuideModelInfo("r", Path("/r"), "lm", "q", 100),
})
BASE = {"model": "m", "prompt": "1+1=", "temperature": 0}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "1+1="}], "temperature": 0}


def cache(**overrides) -> ResponseCache:
    args = dict(backend=MemoryBackend(8), namespace="ns", ttl_s=60, model_name="m", model_revision_id="r1",
                guide_revisions={"v": "gv", "w": "gw"})
    return ResponseCache(**{**args, **overrides})


SCORERS = ["demo-verifier", "rm", "rm2"]


def _search(request) -> SearchParams | None:
    if request.search is None:
        return None
    return parse_search(request.search, SCORERS, SearchLimits(max_candidates=16, max_block_tokens=64))


def completion_key(response_cache: ResponseCache, body: dict) -> str | None:
    request = CompletionRequest.model_validate(body)
    return response_cache.key_for(
        "text_completion", request, parse_guidance(request.guidance or [], CATALOG, budget=request.kl_budget),
        _search(request))


def chat_key(response_cache: ResponseCache, body: dict) -> str | None:
    request = ChatCompletionRequest.model_validate(body)
    return response_cache.key_for(
        "chat.completion", request, parse_guidance(request.guidance or [], CATALOG, budget=request.kl_budget),
        _search(request))


COMPLETION_CHANGES = [
    {"prompt": "1+2="}, {"prompt": [1, 2]}, {"model": "other"}, {"temperature": 0, "seed": 1}, {"seed": 2},
    {"top_p": 0.5}, {"top_k": 3}, {"n": 2}, {"stop": "x"}, {"stop": ["x", "y"]}, {"max_tokens": 5},
    {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"logprobs": 1}, {"echo": True}, {"ignore_eos": True},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0}]},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 2.0}]},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0, "top_k": 5}]},
    {"guidance": [{"type": "qsharp", "model": "w", "strength": 1.0}]},
    {"guidance": [{"type": "cd", "model": "v", "strength": 1.0}]},
    # a KL budget, on the entry or the request: the response's `guidance` says which
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0, "max_kl": 1.0}]},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0}], "max_kl": 1.0},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0}], "max_kl": 2.0},
    {"guidance": [{"type": "qsharp", "model": "v", "strength": 1.0}], "kl_per_token": 1.0},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "rm"}},
    {"search": {"type": "best_of_n", "n": 8, "scorer": "rm"}},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "demo-verifier"}},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "demo-verifier", "reference": "5"}},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "demo-verifier", "reference": 5}},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "demo-verifier", "reference": {"answer": "5"}}},
    {"search": {"type": "best_of_n", "n": 4, "scorer": "rm", "temperature": 0.5}, "seed": 1},
    {"search": {"type": "blockwise", "candidates": 4, "block_tokens": 8, "scorer": "rm"}},
    {"search": {"type": "blockwise", "candidates": 4, "block_tokens": 4, "scorer": "rm"}},
    {"search": {"type": "blockwise", "candidates": 2, "block_tokens": 8, "scorer": "rm"}},
]


def test_every_output_affecting_completion_field_changes_the_key():
    response_cache = cache()
    keys = [completion_key(response_cache, BASE)]
    keys += [completion_key(response_cache, {**BASE, **change}) for change in COMPLETION_CHANGES]
    assert None not in keys
    assert len(set(keys)) == len(keys)


def test_every_output_affecting_chat_field_changes_the_key():
    response_cache = cache()
    changes = [{"messages": [{"role": "user", "content": "1+2="}]},
               {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1="}]},
               {"max_tokens": 3}, {"max_completion_tokens": 3}, {"logprobs": True},
               {"logprobs": True, "top_logprobs": 2}, {"seed": 5}, {"n": 2}]
    keys = [chat_key(response_cache, CHAT)] + [chat_key(response_cache, {**CHAT, **c}) for c in changes]
    assert len(set(keys)) == len(keys)
    assert chat_key(response_cache, CHAT) != completion_key(response_cache, BASE)


def test_stream_user_and_identity():
    response_cache = cache()
    key = completion_key(response_cache, BASE)
    assert completion_key(response_cache, {**BASE, "stream": True, "stream_options": {"include_usage": True},
                                           "user": "u"}) == key
    assert completion_key(cache(model_revision_id="r2"), BASE) != key
    guided = {**BASE, "guidance": [{"type": "qsharp", "model": "v", "strength": 1.0}]}
    assert completion_key(cache(guide_revisions={"v": "other", "w": "gw"}), guided) != completion_key(
        response_cache, guided)
    # A guide model the request does not use does not matter.
    assert completion_key(cache(guide_revisions={"v": "gv", "w": "changed"}), guided) == completion_key(
        response_cache, guided)
    assert completion_key(cache(namespace="x"), BASE).startswith("x:v1:")


def test_a_contrast_entry_is_identified_by_both_of_its_models():
    guided = {**BASE, "guidance": [{"type": "contrast", "model": "e", "reference": "r", "strength": 1.0}]}
    key = completion_key(cache(guide_revisions={"e": "e1", "r": "r1"}), guided)
    assert completion_key(cache(guide_revisions={"e": "e1", "r": "r2"}), guided) != key
    assert completion_key(cache(guide_revisions={"e": "e2", "r": "r1"}), guided) != key
    swapped = {**BASE, "guidance": [{"type": "contrast", "model": "r", "reference": "e", "strength": 1.0}]}
    assert completion_key(cache(guide_revisions={"e": "e1", "r": "r1"}), swapped) != key


def test_a_scorer_model_is_identified_by_its_weights():
    searched = {**BASE, "search": {"type": "best_of_n", "n": 4, "scorer": "rm"}}
    key = completion_key(cache(guide_revisions={"rm": "r1", "rm2": "x"}), searched)
    assert completion_key(cache(guide_revisions={"rm": "r2", "rm2": "x"}), searched) != key
    assert completion_key(cache(guide_revisions={"rm": "r1", "rm2": "y"}), searched) == key


def test_soft_selection_without_a_seed_is_not_cached():
    soft = {"type": "best_of_n", "n": 4, "scorer": "rm", "temperature": 0.5}
    assert completion_key(cache(), {**BASE, "search": soft}) is None
    assert completion_key(cache(), {**BASE, "search": soft, "seed": 3}) is not None
    assert completion_key(cache(), {**BASE, "search": {**soft, "temperature": 0}}) is not None


@pytest.mark.parametrize("body", [{"temperature": 1.0}, {"temperature": None}, {"temperature": 0.5},
                                  {"temperature": 0, "cache": False}])
def test_nondeterministic_or_opted_out_requests_have_no_key(body):
    assert completion_key(cache(), {**BASE, **body}) is None
    assert completion_key(cache(), {**BASE, "temperature": 0.5, "seed": 3}) is not None


def test_cache_off_has_no_key():
    assert completion_key(cache(backend=None), BASE) is None


def test_key_is_canonical():
    assert cache_key("n", {"a": 1, "b": 2}, "e", {"x": 1, "y": 2}) == cache_key("n", {"b": 2, "a": 1}, "e",
                                                                                 {"y": 2, "x": 1})


def test_model_revision_follows_content(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = model_revision(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 10)
    assert model_revision(tmp_path) != first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert model_revision(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_revision(tmp_path) != first


def test_memory_backend_lru_and_ttl():
    async def run():
        backend = MemoryBackend(max_entries=2)
        await backend.set("a", b"1", ttl_s=60)
        await backend.set("b", b"2", ttl_s=60)
        assert await backend.get("a") == b"1"  # a is now the most recent
        await backend.set("c", b"3", ttl_s=60)
        assert await backend.get("b") is None and await backend.get("a") == b"1"
        await backend.set("short", b"4", ttl_s=1)
        backend._entries["short"] = (time.monotonic() - 1, b"4")  # expired
        assert await backend.get("short") is None

    asyncio.run(run())


def test_redis_backend_round_trip_outage_and_recovery():
    server = RedisServer().start()
    try:
        async def run():
            backend = RedisBackend(server.url, timeout_s=0.1, cooldown_s=0.3)
            await backend.set("k", b"v", ttl_s=30)
            assert await backend.get("k") == b"v"
            assert 0 < server.client().ttl("k") <= 30
            server.kill()
            began = time.perf_counter()
            for _ in range(20):  # one failure, then skipped without waiting while cooling down
                with pytest.raises(Exception):
                    await backend.get("k")
            assert time.perf_counter() - began < 0.5
            server.start()
            await asyncio.sleep(0.35)
            await backend.set("k2", b"v2", ttl_s=30)
            assert await backend.get("k2") == b"v2"
            await backend.close()

        asyncio.run(run())
    finally:
        server.kill()


def test_service_fails_open_and_counts(monkeypatch):
    class Broken:
        name = "redis"

        async def get(self, key):
            raise ConnectionError("down")

        async def set(self, key, value, ttl_s):
            raise ConnectionError("down")

        async def close(self):
            pass

    response_cache = cache(backend=Broken())

    async def run():
        assert await response_cache.lookup("k") is None
        await response_cache.store("k", {"x": 1})

    asyncio.run(run())
