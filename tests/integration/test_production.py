"""Production behaviour on a server with Redis, API keys and tight limits (real components)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.redis_server import RedisServer

pytestmark = pytest.mark.engine

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_n": 3, "max_tokens_limit": 400, "max_guidance_entries": 2, "max_body_bytes": 4096,
          "max_num_seqs": 4, "max_waiting_requests": 4}


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def prod(tmp_path_factory, redis_server):
    flags = ["--redis-url", redis_server.url, "--api-keys", f"other-key,{KEY}", "--redis-cooldown-s", "0.5",
             "--drain-timeout-s", "60"]
    for name, value in LIMITS.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    server = start_server(tmp_path_factory.mktemp("prod") / "server.log", *flags)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(prod):
    with httpx.Client(base_url=prod.base_url, timeout=120, headers=AUTH) as http:
        yield http


def completion(client, **body):
    return client.post("/v1/completions", json={"model": "demo-base", "prompt": "12+34=", "max_tokens": 8, **body})


def envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# Auth

def test_api_key_required_on_v1_and_open_on_probes(prod):
    with httpx.Client(base_url=prod.base_url, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = anonymous.post("/v1/completions", json={"model": "demo-base", "prompt": "1"}, headers=headers)
            assert envelope(response, 401)["code"] == "invalid_api_key"
        assert envelope(anonymous.get("/v1/models"), 401)["type"] == "invalid_request_error"
        for path in ("/health", "/ready", "/metrics"):
            assert anonymous.get(path).status_code == 200
        for key in ("other-key", KEY):
            assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_anthropic_sdk_authenticates_with_x_api_key(prod):
    import anthropic

    kwargs = dict(model="demo-base", max_tokens=4, messages=[{"role": "user", "content": "1+1="}])
    assert anthropic.Anthropic(base_url=prod.base_url, api_key=KEY, max_retries=0).messages.create(**kwargs).content
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=prod.base_url, api_key="wrong", max_retries=0).messages.create(**kwargs)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_responses_api_needs_the_key_and_a_stored_response_too(prod):
    import openai

    kwargs = dict(model="demo-base", input="1+1=", max_output_tokens=4)
    created = openai.OpenAI(base_url=f"{prod.base_url}/v1", api_key=KEY, max_retries=0).responses.create(**kwargs)
    assert created.output_text
    stranger = openai.OpenAI(base_url=f"{prod.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        stranger.responses.create(**kwargs)
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        stranger.responses.retrieve(created.id)
    with pytest.raises(openai.AuthenticationError):
        stranger.responses.cancel(created.id)


# Limits

@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "1", "n": 4}, "n"),
        ("/v1/completions", {"prompt": "1", "max_tokens": 401}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}], "max_completion_tokens": 401},
         "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}], "n": 9}, "n"),
        ("/v1/completions", {"prompt": "1", "guidance": [{"type": "arm", "model": "demo-arm", "strength": 1}] * 3},
         "guidance"),
    ],
)
def test_caps_are_400_naming_the_field(client, path, body, param):
    assert envelope(client.post(path, json={"model": "demo-base", **body}), 400)["param"] == param


def test_default_max_tokens_is_capped(client):
    response = client.post("/v1/chat/completions", json={
        "model": "demo-base", "messages": [{"role": "user", "content": "1+1="}], "ignore_eos": True})
    assert response.json()["usage"]["completion_tokens"] == LIMITS["max_tokens_limit"]


def test_body_over_limit_is_413(client):
    big = {"model": "demo-base", "prompt": "1" * 5000}
    assert envelope(client.post("/v1/completions", json=big), 413)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"model": "demo-base", "prompt": "'
        for _ in range(10):
            yield b"1" * 1000
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    envelope(response, 413)


def test_backpressure_is_429_with_retry_after(prod):
    """4 running + 4 waiting fit; beyond that, 429."""
    async def run():
        async with httpx.AsyncClient(base_url=prod.base_url, timeout=120, headers=AUTH) as http:
            # The longest request the limits allow, so that the first ones still hold the engine when the
            # last arrive, however busy the machine.
            body = {"model": "demo-base", "prompt": "1+1=", "max_tokens": LIMITS["max_tokens_limit"],
                    "ignore_eos": True, "n": LIMITS["max_n"], "cache": False}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert envelope(rejected, 429)["type"] == "rate_limit_error"


# Cache (Redis)

def cache_count(client, outcome: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("alignserve_cache_requests_total") and f'outcome="{outcome}"' in line \
                and 'backend="redis"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_redis_cache_hit_and_miss(client, redis_server):
    store = redis_server.client()
    body = {"prompt": "321+123=", "temperature": 0, "max_tokens": 6}
    misses, hits = cache_count(client, "miss"), cache_count(client, "hit")
    first = completion(client, **body).json()
    keys = store.keys("alignserve:*")
    assert keys, "the deterministic response was not stored in Redis"
    second = completion(client, **body).json()
    assert second["choices"] == first["choices"] and second["id"] != first["id"]
    assert cache_count(client, "miss") == misses + 1 and cache_count(client, "hit") == hits + 1
    # Streamed from the cache: the same text.
    with client.stream("POST", "/v1/completions", json={"model": "demo-base", "stream": True, **body}) as response:
        import json
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in response.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == first["choices"][0]["text"]
    assert cache_count(client, "hit") == hits + 2


def test_nondeterministic_requests_are_never_cached(client, redis_server):
    store = redis_server.client()
    before = set(store.keys("alignserve:*"))
    completion(client, prompt="5+5=", temperature=1.0)
    completion(client, prompt="5+5=", temperature=0, cache=False)
    completion(client, prompt="5+6=", temperature=0.7, top_p=0.9)
    assert set(store.keys("alignserve:*")) == before


def test_redis_killed_mid_traffic_fails_no_request_and_caching_resumes(prod, client, redis_server):
    failures: list = []
    done = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=prod.base_url, timeout=60, headers=AUTH) as http:
            i = 0
            while not done.is_set():
                response = http.post("/v1/completions", json={
                    "model": "demo-base", "prompt": f"{i}+{i}=", "temperature": 0, "max_tokens": 6})
                if response.status_code != 200:
                    failures.append(response.status_code)
                i += 1

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    errors_before = cache_count(client, "error")
    redis_server.kill()
    time.sleep(3.0)
    done.set()
    for worker in workers:
        worker.join(timeout=60)
    assert failures == []
    assert cache_count(client, "error") > errors_before

    redis_server.start()  # same port
    time.sleep(1.0)  # past the cooldown
    body = {"prompt": "77+11=", "temperature": 0, "max_tokens": 6}
    completion(client, **body)
    hits = cache_count(client, "hit")
    completion(client, **body)
    assert cache_count(client, "hit") == hits + 1
    assert redis_server.client().keys("alignserve:*")


def test_cached_request_is_faster(client):
    body = {"prompt": "999+1=", "temperature": 0, "max_tokens": 60, "ignore_eos": True}
    began = time.perf_counter()
    completion(client, **body)
    cold = time.perf_counter() - began
    began = time.perf_counter()
    completion(client, **body)
    warm = time.perf_counter() - began
    assert warm < cold
