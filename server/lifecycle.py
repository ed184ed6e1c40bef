"""Admission and shutdown: backpressure on the engine queue and on the guide models' KV
budget, draining on SIGTERM, and stopping when the engine dies.

Draining: `/ready` answers 503 and new generation requests get 503 while the
requests already admitted finish (up to the drain timeout); then the server exits.

Engine death (`engine_died`): new requests get 503 engine_dead, and the server exits with
`exit_code` 1 so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from collections import Counter
from collections.abc import Mapping

from server.errors import EngineDead, ServiceUnavailable, TooManyRequests
from server.metrics import DRAINING, GUIDE_KV_BLOCKS, GUIDE_KV_BLOCKS_HELD, GUIDE_KV_REJECTED

logger = logging.getLogger(__name__)


class Lifecycle:
    """Counts admitted requests, the engine requests they hold and, under a guide-KV budget,
    the blocks of each guide model's KV cache they may fill (guidance.kv_budget).

    Admission and the reservation of engine requests and blocks happen in one synchronous
    step, so requests that arrive together cannot all pass the bound before any is counted.
    """

    def __init__(self, max_waiting_requests: int, retry_after_s: int) -> None:
        self.max_waiting_requests = max_waiting_requests
        self.retry_after_s = retry_after_s
        self.guide_kv_blocks: dict[str, int] = {}  # capacity per budgeted guide model (none: unbudgeted)
        self.guide_blocks_held: Counter[str] = Counter()
        self.draining = False
        self.exit_code: int | None = None  # set when the server must stop on its own (the engine died)
        self._died_at: float | None = None
        self.in_flight = 0  # admitted HTTP generation requests not yet answered
        self.engine_requests = 0  # engine requests those admitted requests hold
        self._idle = asyncio.Event()
        self._idle.set()

    def budget_guide_kv(self, blocks: Mapping[str, int]) -> None:
        """Bound admission by each guide model's KV blocks (guidance.kv_budget.guide_kv_capacity)."""
        self.guide_kv_blocks = dict(blocks)
        for name, capacity in blocks.items():
            GUIDE_KV_BLOCKS.labels(name).set(capacity)

    def admit(self, engine_requests: int, capacity: int, guide_blocks: Mapping[str, int] | None = None) -> None:
        """Admit a request needing `engine_requests` (and up to `guide_blocks` blocks of guide
        models' KV caches), or refuse it: 503 while draining, 429 when the engine's queue would
        exceed its bound or a budgeted guide model's blocks would run out.

        The engine runs at most `capacity` requests at once; the rest of those held by
        admitted requests wait. An admitted request must be `release`d exactly once, with
        the same arguments.
        """
        if self.exit_code is not None:
            raise EngineDead()
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.", code="draining")
        waiting = max(0, self.engine_requests + engine_requests - capacity)
        if waiting > self.max_waiting_requests:
            raise TooManyRequests(
                f"The server is overloaded ({waiting} requests would wait, over the bound of "
                f"{self.max_waiting_requests}); retry later.", retry_after_s=self.retry_after_s)
        blocks = {name: n for name, n in (guide_blocks or {}).items() if name in self.guide_kv_blocks}
        for name, n in blocks.items():
            if self.guide_blocks_held[name] + n > self.guide_kv_blocks[name]:
                GUIDE_KV_REJECTED.labels(name).inc()
                raise TooManyRequests(
                    f"The KV cache of guide model {name!r} is full ({self.guide_blocks_held[name]} of "
                    f"{self.guide_kv_blocks[name]} blocks held; this request may need {n}); retry later.",
                    retry_after_s=self.retry_after_s)
        for name, n in blocks.items():
            self.guide_blocks_held[name] += n
            GUIDE_KV_BLOCKS_HELD.labels(name).set(self.guide_blocks_held[name])
        self.engine_requests += engine_requests
        self.in_flight += 1
        self._idle.clear()

    def release(self, engine_requests: int, guide_blocks: Mapping[str, int] | None = None) -> None:
        for name, n in (guide_blocks or {}).items():
            if name in self.guide_kv_blocks:
                self.guide_blocks_held[name] -= n
                GUIDE_KV_BLOCKS_HELD.labels(name).set(self.guide_blocks_held[name])
        self.engine_requests -= engine_requests
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def engine_died(self) -> None:
        """Refuse new requests and ask the server to exit non-zero (server.cli watches `should_exit`)."""
        self.exit_code = 1
        self._died_at = time.monotonic()

    def should_exit(self, grace_s: float) -> bool:
        """Whether the server should stop listening: `grace_s` after the engine died (meanwhile the 503s of
        the requests it ended go out, and /health and /ready answer 503 rather than refusing connections)."""
        return self._died_at is not None and time.monotonic() - self._died_at >= grace_s

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting and wait for in-flight requests; False if the timeout ran out first."""
        self.draining = True
        DRAINING.set(1)
        began = time.monotonic()
        logger.info("draining %d in-flight requests (timeout %.0f s)", self.in_flight, timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("drain timeout: %d requests still in flight", self.in_flight)
            return False
        logger.info("drained in %.1f s", time.monotonic() - began)
        return True
