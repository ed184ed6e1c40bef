"""Stream merging and server-sent event encoding."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import ClientDisconnect

from server.api.streaming import SSE_DONE, EventStream, sse
from server.streams import merge, tagged


async def _items(values, delay: float, log: list | None = None):
    try:
        for value in values:
            await asyncio.sleep(delay)
            yield value
    finally:
        if log is not None:
            log.append("closed")


def test_sse_encoding():
    assert sse({"a": [1, "é"]}) == 'data: {"a":[1,"é"]}\n\n'
    assert json.loads(sse({"x": 1})[len("data: "):]) == {"x": 1}
    assert SSE_DONE == "data: [DONE]\n\n"


def test_merge_interleaves_and_keeps_every_item():
    async def run():
        streams = [tagged(0, _items("abc", 0.01)), tagged(1, _items("xy", 0.015))]
        return [item async for item in merge(streams)]

    merged = asyncio.run(run())
    assert sorted(merged) == [(0, "a"), (0, "b"), (0, "c"), (1, "x"), (1, "y")]
    assert [v for t, v in merged if t == 0] == list("abc")


def test_closing_merge_closes_every_stream():
    log: list = []

    async def run():
        merged = merge([_items(range(100), 0.01, log), _items(range(100), 0.01, log)])
        async for _ in merged:
            break
        await merged.aclose()

    asyncio.run(run())
    assert log == ["closed", "closed"]


def test_merge_propagates_errors():
    async def failing():
        yield 1
        raise ValueError("boom")

    async def run():
        return [item async for item in merge([failing(), _items([5], 0.05)])]

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run())


@pytest.mark.parametrize("client", ["reads all", "leaves", "never reads"])
def test_event_stream_calls_on_close_once_however_it_ends(client):
    """An admitted stream's release runs once, whether it is sent whole, cut short, or never started."""
    closed: list = []
    response = EventStream(_items(["data: 1\n\n", "data: 2\n\n"], 0.01), on_close=lambda: closed.append(1))
    sent: list = []

    async def receive():
        if client == "reads all":
            await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message):
        if client == "never reads":
            raise OSError("connection reset")
        sent.append(message)

    async def run():
        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except (OSError, ClientDisconnect):  # starlette reports a failed send as a disconnect
            pass

    asyncio.run(run())
    assert closed == [1]
    if client == "reads all":
        assert b"data: 2" in b"".join(m.get("body", b"") for m in sent)
