"""KL reports of finished guided requests, fetched from the worker in batches.

A report lives in the worker process and costs one collective RPC to fetch. Requests that
finish in the same engine step ask at about the same moment; `ReportBatcher.get` gathers the
keys asked for while no fetch is in flight into one RPC, so a step that finishes 32 guided
requests costs one round trip, not 32.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# (KL summed over the request's tokens, steered steps, with a KL budget the strength scale's (mean, min, max))
Report = tuple[float, int, tuple[float, float, float] | None]
FetchReports = Callable[[list[str]], Awaitable[dict[str, Report]]]


class ReportBatcher:
    def __init__(self, fetch: FetchReports) -> None:
        self._fetch = fetch
        self._waiting: dict[str, asyncio.Future[Report]] = {}
        self._flush: asyncio.Task | None = None

    async def get(self, key: str) -> Report:
        """The report of request `key` ((0.0, 0, None) if the worker has none: it was never guided)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        if self._flush is None:
            self._flush = asyncio.create_task(self._fetch_waiting())
        return await future

    async def _fetch_waiting(self) -> None:
        await asyncio.sleep(0)  # one loop turn: the other requests finished by this engine output ask too
        waiting, self._waiting = self._waiting, {}
        try:
            reports = await self._fetch(list(waiting))
        except Exception as exc:  # every request of the batch sees the failure
            for future in waiting.values():
                if not future.done():
                    future.set_exception(exc)
        else:
            for key, future in waiting.items():
                if not future.done():
                    future.set_result(reports.get(key, (0.0, 0, None)))
        finally:
            self._flush = None
            if self._waiting:  # asked while this fetch was in flight: the next batch
                self._flush = asyncio.create_task(self._fetch_waiting())
