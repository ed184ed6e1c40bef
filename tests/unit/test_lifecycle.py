"""Admission (429 with Retry-After, 503 while draining), release, and draining."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ServiceUnavailable, TooManyRequests
from server.lifecycle import Lifecycle


def test_admission_reserves_engine_requests_and_bounds_the_waiting():
    lifecycle = Lifecycle(max_waiting_requests=4, retry_after_s=2)
    lifecycle.admit(engine_requests=7, capacity=4)  # 4 run, 3 wait
    lifecycle.admit(engine_requests=1, capacity=4)  # 4 wait
    assert (lifecycle.in_flight, lifecycle.engine_requests) == (2, 8)
    with pytest.raises(TooManyRequests) as info:
        lifecycle.admit(engine_requests=1, capacity=4)  # 5 would wait
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "2"}
    assert (lifecycle.in_flight, lifecycle.engine_requests) == (2, 8)  # a refusal reserves nothing
    lifecycle.release(7)
    lifecycle.admit(engine_requests=5, capacity=4)  # 1 + 5 held: 2 wait
    assert (lifecycle.in_flight, lifecycle.engine_requests) == (2, 6)


def test_guide_kv_budget_holds_blocks_from_admission_to_release():
    lifecycle = Lifecycle(max_waiting_requests=100, retry_after_s=3)
    lifecycle.budget_guide_kv({"value": 10, "prefix": 4})
    lifecycle.admit(1, capacity=4, guide_blocks={"value": 6, "reward": 99})  # an unbudgeted model holds nothing
    with pytest.raises(TooManyRequests, match=r"guide model 'value' is full \(6 of 10 blocks held; this request may "
                                              r"need 5\)") as info:
        lifecycle.admit(1, capacity=4, guide_blocks={"value": 5, "prefix": 1})
    assert info.value.headers == {"Retry-After": "3"}
    # A refusal holds nothing, not even the blocks of the models that had room.
    assert (lifecycle.in_flight, lifecycle.engine_requests) == (1, 1)
    assert lifecycle.guide_blocks_held == {"value": 6}
    lifecycle.admit(1, capacity=4, guide_blocks={"value": 4, "prefix": 4})  # exactly full
    lifecycle.release(1, guide_blocks={"value": 6, "reward": 99})
    lifecycle.admit(1, capacity=4, guide_blocks={"value": 6})
    assert lifecycle.guide_blocks_held == {"value": 10, "prefix": 4}


def test_requests_arriving_together_cannot_all_pass_the_bound():
    """Each admission counts at once, before the engine has seen any of them."""
    lifecycle = Lifecycle(max_waiting_requests=4, retry_after_s=1)
    outcomes = []
    for _ in range(8):
        try:
            lifecycle.admit(engine_requests=3, capacity=4)
            outcomes.append(200)
        except TooManyRequests:
            outcomes.append(429)
    assert outcomes == [200] * 2 + [429] * 6 and lifecycle.engine_requests == 6


def test_draining_refuses_and_waits_for_in_flight():
    async def run():
        lifecycle = Lifecycle(max_waiting_requests=10, retry_after_s=1)
        lifecycle.admit(1, capacity=4)
        lifecycle.admit(2, capacity=4)
        drain = asyncio.create_task(lifecycle.drain(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            lifecycle.admit(1, capacity=4)
        lifecycle.release(1)
        await asyncio.sleep(0.01)
        assert not drain.done()
        lifecycle.release(2)
        assert await drain is True
        assert (lifecycle.in_flight, lifecycle.engine_requests) == (0, 0)

    asyncio.run(run())


def test_drain_timeout():
    async def run():
        lifecycle = Lifecycle(max_waiting_requests=10, retry_after_s=1)
        lifecycle.admit(1, capacity=4)
        assert await lifecycle.drain(timeout_s=0.05) is False

    asyncio.run(run())
