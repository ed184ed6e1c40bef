"""Admission (429 with Retry-After, 503 while draining) and draining."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ServiceUnavailable, TooManyRequests
from server.lifecycle import Lifecycle


def test_admission_bounds_waiting_requests():
    lifecycle = Lifecycle(max_waiting_requests=4, retry_after_s=2)
    lifecycle.admit(new_engine_requests=8, pending=0, capacity=4)  # 4 run, 4 wait
    lifecycle.admit(new_engine_requests=1, pending=7, capacity=4)  # 4 wait
    with pytest.raises(TooManyRequests) as info:
        lifecycle.admit(new_engine_requests=2, pending=7, capacity=4)  # 5 would wait
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "2"}


def test_draining_refuses_and_waits_for_in_flight():
    async def run():
        lifecycle = Lifecycle(max_waiting_requests=10, retry_after_s=1)
        lifecycle.enter()
        lifecycle.enter()
        drain = asyncio.create_task(lifecycle.drain(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            lifecycle.admit(1, 0, 4)
        lifecycle.leave()
        await asyncio.sleep(0.01)
        assert not drain.done()
        lifecycle.leave()
        assert await drain is True

    asyncio.run(run())


def test_drain_timeout():
    async def run():
        lifecycle = Lifecycle(max_waiting_requests=10, retry_after_s=1)
        lifecycle.enter()
        assert await lifecycle.drain(timeout_s=0.05) is False

    asyncio.run(run())


def test_track_leaves_when_the_stream_ends_or_is_dropped():
    async def items():
        yield "a"
        yield "b"

    async def run():
        lifecycle = Lifecycle(max_waiting_requests=10, retry_after_s=1)
        lifecycle.enter()
        assert [x async for x in lifecycle.track(items())] == ["a", "b"]
        assert lifecycle.in_flight == 0
        lifecycle.enter()
        stream = lifecycle.track(items())
        await stream.__anext__()
        await stream.aclose()
        assert lifecycle.in_flight == 0

    asyncio.run(run())
