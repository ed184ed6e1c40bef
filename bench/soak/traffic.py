"""What the soak (bench/soak) sends, and how each request ended as its client saw it.

The mix is built from what the server offers (GET /v1/guidance): completions and chat, streamed
and not, unguided, each guidance module with a guide model of its own, two entries composed,
structured output with guidance, best-of-N, pruned best-of-N, blockwise, cached and seeded
replays (sent twice: the texts must match), and clients that leave a stream after a few chunks.
`Load` sends requests from closed-loop clients, each request bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import httpx

from bench.faults.sitecustomize import STALL_VERIFIER
from bench.suite.workload import STRENGTH

MAX_TOKENS = 16  # of a mixed request
SEARCH_TOKENS = 8  # of each search candidate
SEARCH_CANDIDATES = 4  # best-of-N n, pruned n, blockwise candidates: the most engine requests a mixed request holds
LEAVE_TOKENS = 64  # a leaving client's request, long enough to be left mid-stream
LEAVE_AFTER_CHUNKS = 3
VALUE_HEADS = ("bernoulli", "histogram", "expected")  # model scorers that score prefixes (pruning, blockwise)
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class RequestSpec:
    path: str
    body: dict
    kind: str = ""
    leave_after: int | None = None  # chunks after which the client closes the stream
    replay: bool = False  # sent twice in a row: the two texts must match
    timeout_s: float | None = None  # the client's deadline, when not the load's

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class RequestRecord:
    """One request as the client saw it; times are `time.monotonic()`."""

    kind: str
    stream: bool
    started: float
    ended: float = 0.0
    status: int | None = None
    error: dict | None = None  # the error object of the body, or of a stream's error event
    in_stream: bool = False  # the error came as a stream event after a 200
    done: bool = False  # the stream ended with data: [DONE]
    retry_after: str | None = None
    completion_tokens: int = 0
    text: str = ""
    left: bool = False  # the client closed the stream on purpose
    hung: bool = False  # no answer by the client's deadline
    transport_error: str | None = None
    replay_matched: bool | None = None  # the second of a replayed pair: its text equals the first's

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


# How a request ended

def is_envelope(error: object) -> bool:
    """Whether `error` is the OpenAI error object {"message", "type", "param", "code"}."""
    return isinstance(error, dict) and set(error) == ENVELOPE_FIELDS


def error_code(record: RequestRecord) -> str | None:
    return record.error.get("code") if isinstance(record.error, dict) else None


def outcome(record: RequestRecord) -> str:
    """The request's outcome as a label: "200", "429 overloaded", "200 stream-error engine_dead", "hung", ..."""
    if record.hung:
        return "hung"
    if record.transport_error is not None:
        return "transport-error"
    if record.left:
        return "left"
    label = f"{record.status} stream-error" if record.in_stream else str(record.status)
    code = error_code(record)
    return f"{label} {code}" if code else label


def is_ok(record: RequestRecord) -> bool:
    """A 200 with no error event (a stream also ended with [DONE])."""
    return (record.status == 200 and not record.in_stream and not record.hung and record.transport_error is None
            and (record.done or not record.stream))


def is_server_error(record: RequestRecord) -> bool:
    """A 500-class failure: an HTTP 5xx other than 503, or a stream's error event of type server_error."""
    if record.in_stream:
        return not is_envelope(record.error) or record.error["type"] == "server_error"
    return record.status is not None and record.status >= 500 and record.status != 503


def is_clean(record: RequestRecord) -> bool:
    """Ended as the contract allows: 200; a 4xx or 503 with the OpenAI error envelope (as the body, or as
    a stream's error event followed by [DONE]); or left by its client on purpose."""
    if record.hung or record.transport_error is not None:
        return False
    if record.left or is_ok(record):
        return True
    if record.in_stream:
        return record.done and not is_server_error(record)
    status = record.status or 0
    return (400 <= status < 500 or status == 503) and is_envelope(record.error)


def is_engine_dead(record: RequestRecord) -> bool:
    """Answered engine_dead with the envelope: a 503, or once streaming an error event, then [DONE]."""
    if not is_envelope(record.error) or error_code(record) != "engine_dead":
        return False
    return record.done if record.in_stream else record.status == 503


# The mix

@dataclass(frozen=True)
class Offer:
    """What the server offers that the mix exercises (GET /v1/models and /v1/guidance)."""

    model: str
    entries: tuple[dict, ...]  # one guidance entry per module that has a guide model
    scorer: str  # best-of-N scorer: a model scorer, else a verifier
    value_scorer: str | None  # a model scorer of prefixes: pruning and blockwise


def offer_from_listing(model: str, listing: dict) -> Offer:
    """Each module with the first guide model of a head it takes (and, for a module that contrasts two, the
    next one as its `reference`); scorers other than the fault harness's."""
    guides = listing["guide_models"]
    entries = []
    for module in listing["modules"]:
        usable = [g["name"] for g in guides if g["head"] in module["guide_heads"]]
        if "reference" in module["parameters"]:
            if len(usable) >= 2:
                entries.append({"type": module["type"], "model": usable[0], "reference": usable[1],
                                "strength": STRENGTH})
        elif usable:
            entries.append({"type": module["type"], "model": usable[0], "strength": STRENGTH})
    scorers = [s for s in listing["search"]["scorers"] if s["name"] != STALL_VERIFIER]
    models = [s for s in scorers if s["kind"] == "model"]
    value = next((s["name"] for s in models if s.get("head") in VALUE_HEADS), None)
    return Offer(model, tuple(entries), (models or scorers)[0]["name"], value)


def _streamed(body: dict, stream: bool) -> dict:
    return {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else body


def completion(offer: Offer, prompt: str, stream: bool = False, **fields) -> RequestSpec:
    body = {"model": offer.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0, **fields}
    return RequestSpec("/v1/completions", _streamed(body, stream))


def chat(offer: Offer, prompt: str, stream: bool = False, **fields) -> RequestSpec:
    body = {"model": offer.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 1.0, **fields}
    return RequestSpec("/v1/chat/completions", _streamed(body, stream))


Builder = Callable[[str, int], RequestSpec]  # (prompt, index) -> request


def _either(offer: Offer, prompt: str, index: int, **fields) -> RequestSpec:
    """Completions or chat, streamed or not, by the index."""
    return (chat if index % 2 else completion)(offer, prompt, stream=index % 4 < 2, **fields)


def _searches(offer: Offer) -> dict[str, Builder]:
    best = {"type": "best_of_n", "n": SEARCH_CANDIDATES, "scorer": offer.scorer}
    builders: dict[str, Builder] = {
        "best-of-n": lambda p, i: _either(offer, p, i, max_tokens=SEARCH_TOKENS, search=best)}
    if offer.value_scorer is not None:
        pruned = {**best, "prune": {"scorer": offer.value_scorer, "every": 2, "fraction": 0.5}}
        blockwise = {"type": "blockwise", "candidates": SEARCH_CANDIDATES, "block_tokens": SEARCH_TOKENS // 2,
                     "scorer": offer.value_scorer}
        builders["pruned"] = lambda p, i: _either(offer, p, i, max_tokens=SEARCH_TOKENS, search=pruned)
        builders["blockwise"] = lambda p, i: _either(offer, p, i, max_tokens=SEARCH_TOKENS, search=blockwise)
    return builders


def _structured(offer: Offer, prompt: str, index: int) -> RequestSpec:
    """A JSON schema (chat) or a regex (completions), with the first guidance entry when there is one."""
    guidance = {"guidance": list(offer.entries[:1])} if offer.entries else {}
    if index % 2:
        schema = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}
        return chat(offer, prompt, stream=index % 4 < 2, **guidance,
                    response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    return completion(offer, prompt, stream=index % 4 < 2, structured_outputs={"regex": "[0-9]{1,6}"}, **guidance)


def _guided(offer: Offer) -> dict[str, Builder]:
    builders: dict[str, Builder] = {f"guided-{e['type']}": (lambda p, i, e=e: _either(offer, p, i, guidance=[e]))
                                    for e in offer.entries}
    if len(offer.entries) >= 2:
        builders["composition"] = lambda p, i: _either(offer, p, i, guidance=list(offer.entries[:2]))
    builders["structured"] = lambda p, i: _structured(offer, p, i)
    return builders


def mix(offer: Offer) -> dict[str, Builder]:
    """Every kind of request the soak sends, by name."""
    seeded_guidance = {"guidance": list(offer.entries[:1])} if offer.entries else {}
    return {
        "completion": lambda p, i: completion(offer, p),
        "completion-stream": lambda p, i: completion(offer, p, stream=True),
        "chat": lambda p, i: chat(offer, p),
        "chat-stream": lambda p, i: chat(offer, p, stream=True),
        **_guided(offer),
        **_searches(offer),
        "cached-replay": lambda p, i: replace(_either(offer, p, i, seed=i), replay=True),
        "seeded-replay": lambda p, i: replace(
            _either(offer, p, i, seed=i, cache=False, **(seeded_guidance if i % 3 == 0 else {})), replay=True),
        "leave-mid-stream": lambda p, i: replace(
            completion(offer, p, stream=True, max_tokens=LEAVE_TOKENS, ignore_eos=True, cache=False),
            leave_after=LEAVE_AFTER_CHUNKS),
    }


def mixed_requests(builders: dict[str, Builder], prompts: Sequence[str], first: int, count: int
                   ) -> Iterator[RequestSpec]:
    """`count` requests cycling through the kinds, numbered from `first` (prompt and seed by number)."""
    kinds = list(builders)
    for index in range(first, first + count):
        kind = kinds[index % len(kinds)]
        yield replace(builders[kind](prompts[index % len(prompts)], index), kind=kind)


# Sending

def _json(content: bytes | str) -> dict:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _choice_text(choice: dict) -> str:
    return choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content") or ""


async def _send_whole(client: httpx.AsyncClient, spec: RequestSpec, record: RequestRecord) -> None:
    response = await client.post(spec.path, json=spec.body)
    record.status, record.retry_after = response.status_code, response.headers.get("retry-after")
    payload = _json(response.content)
    if response.status_code != 200:
        record.error = payload.get("error")
        return
    record.text = "".join(_choice_text(c) for c in payload.get("choices", []))
    record.completion_tokens = (payload.get("usage") or {}).get("completion_tokens", 0)


def read_event(record: RequestRecord, data: str) -> int:
    """Add one SSE `data:` payload to `record`; the chunks of output it held (0 or 1)."""
    if data == "[DONE]":
        record.done = True
        return 0
    event = _json(data)
    if "error" in event:
        record.error, record.in_stream = event["error"], True
        return 0
    record.text += "".join(_choice_text(c) for c in event.get("choices", []))
    record.completion_tokens = (event.get("usage") or {}).get("completion_tokens", record.completion_tokens)
    return 1


async def _send_stream(client: httpx.AsyncClient, spec: RequestSpec, record: RequestRecord) -> None:
    async with client.stream("POST", spec.path, json=spec.body) as response:
        record.status, record.retry_after = response.status_code, response.headers.get("retry-after")
        if response.status_code != 200:
            record.error = _json(await response.aread()).get("error")
            return
        chunks = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                chunks += read_event(record, line[6:])
            if record.done:
                return
            if spec.leave_after is not None and chunks >= spec.leave_after:
                record.left = True  # leaving the block closes the connection
                return


async def _send(client: httpx.AsyncClient, spec: RequestSpec, record: RequestRecord) -> None:
    try:
        await (_send_stream if spec.stream else _send_whole)(client, spec, record)
    except httpx.HTTPError as exc:
        record.transport_error = f"{type(exc).__name__}: {exc}"


class Load:
    """Closed-loop clients: each sends its next request when the last ended, until the requests run out,
    `stop()` is called or `duration_s` has passed. A request not answered within its timeout, or in
    flight when `cut()` is called, is abandoned and recorded as hung. `transport` replaces the network
    (tests pass an `httpx.MockTransport`)."""

    def __init__(self, url: str, specs: Iterable[RequestSpec], concurrency: int, timeout_s: float,
                 duration_s: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url, self.concurrency, self.timeout_s, self.transport = url, concurrency, timeout_s, transport
        self.deadline = time.monotonic() + duration_s
        self.records: list[RequestRecord] = []
        self._specs = iter(specs)
        self._stopped = asyncio.Event()
        self._cut = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    def cut(self) -> None:
        self._cut.set()

    async def run(self) -> list[RequestRecord]:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits,
                                     transport=self.transport) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))
        return self.records

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stopped.is_set() and time.monotonic() < self.deadline:
            spec = next(self._specs, None)
            if spec is None:
                return
            first = await self._bounded(client, spec)
            if spec.replay and is_ok(first) and not self._stopped.is_set():
                second = await self._bounded(client, spec)
                second.replay_matched = second.text == first.text if is_ok(second) else None

    async def _bounded(self, client: httpx.AsyncClient, spec: RequestSpec) -> RequestRecord:
        record = RequestRecord(spec.kind, spec.stream, time.monotonic())
        self.records.append(record)
        request = asyncio.ensure_future(_send(client, spec, record))
        cut = asyncio.ensure_future(self._cut.wait())
        await asyncio.wait({request, cut}, timeout=spec.timeout_s or self.timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        cut.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            record.hung = True
        record.ended = time.monotonic()
        return record
