"""Admission and shutdown: backpressure on the engine queue, and draining on SIGTERM.

Draining: `/ready` answers 503 and new generation requests get 503 while the
requests already admitted finish (up to the drain timeout); then the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.errors import ServiceUnavailable, TooManyRequests
from server.metrics import DRAINING

logger = logging.getLogger(__name__)


class Lifecycle:
    """Counts admitted requests and the engine requests they hold.

    Admission and the reservation of engine requests happen in one synchronous step,
    so requests that arrive together cannot all pass the bound before any is counted.
    """

    def __init__(self, max_waiting_requests: int, retry_after_s: int) -> None:
        self.max_waiting_requests = max_waiting_requests
        self.retry_after_s = retry_after_s
        self.draining = False
        self.in_flight = 0  # admitted HTTP generation requests not yet answered
        self.engine_requests = 0  # engine requests those admitted requests hold
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, engine_requests: int, capacity: int) -> None:
        """Admit a request needing `engine_requests`, or refuse it: 503 while draining, 429
        when the engine's queue would exceed its bound.

        The engine runs at most `capacity` requests at once; the rest of those held by
        admitted requests wait. An admitted request must be `release`d exactly once.
        """
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.", code="draining")
        waiting = max(0, self.engine_requests + engine_requests - capacity)
        if waiting > self.max_waiting_requests:
            raise TooManyRequests(
                f"The server is overloaded ({waiting} requests would wait, over the bound of "
                f"{self.max_waiting_requests}); retry later.", retry_after_s=self.retry_after_s)
        self.engine_requests += engine_requests
        self.in_flight += 1
        self._idle.clear()

    def release(self, engine_requests: int) -> None:
        self.engine_requests -= engine_requests
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

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
