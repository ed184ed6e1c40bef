"""Guidance reports fetched from the worker in batches: one RPC for requests finishing together."""

from __future__ import annotations

import asyncio

import pytest

from server.report_batcher import ReportBatcher


class Worker:
    def __init__(self, reports: dict, fail: bool = False) -> None:
        self.reports, self.fail, self.calls = reports, fail, []

    async def fetch(self, keys: list[str]) -> dict:
        self.calls.append(sorted(keys))
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("engine core died")
        return {k: self.reports[k] for k in keys if k in self.reports}


def test_requests_finishing_together_share_one_fetch_and_get_their_own_report():
    worker = Worker({"a": (0.5, 3, None), "b": (1.25, 7, (0.5, 0.25, 1.0))})

    async def run():
        batcher = ReportBatcher(worker.fetch)
        return await asyncio.gather(*(batcher.get(k) for k in ("a", "b", "never-guided")))

    assert asyncio.run(run()) == [(0.5, 3, None), (1.25, 7, (0.5, 0.25, 1.0)), (0.0, 0, None)]
    assert worker.calls == [["a", "b", "never-guided"]]


def test_a_request_asking_during_a_fetch_goes_into_the_next_one():
    worker = Worker({"a": (1.0, 1), "b": (2.0, 2)})

    async def run():
        batcher = ReportBatcher(worker.fetch)
        first = asyncio.create_task(batcher.get("a"))
        await asyncio.sleep(0.005)  # the fetch of "a" is in flight
        return await asyncio.gather(first, batcher.get("b"))

    assert asyncio.run(run()) == [(1.0, 1), (2.0, 2)]
    assert worker.calls == [["a"], ["b"]]


def test_a_failed_fetch_fails_every_request_of_its_batch_and_the_next_batch_still_runs():
    worker = Worker({}, fail=True)

    async def run():
        batcher = ReportBatcher(worker.fetch)
        results = await asyncio.gather(batcher.get("a"), batcher.get("b"), return_exceptions=True)
        worker.fail, worker.reports = False, {"c": (3.0, 3)}
        return results, await batcher.get("c")

    results, later = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) for r in results) and later == (3.0, 3)

