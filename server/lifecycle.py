"""Admission and shutdown: backpressure on the engine queue, and draining on SIGTERM.

Draining: `/ready` answers 503 and new generation requests get 503 while the
requests already admitted finish (up to the drain timeout); then the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from server.errors import ServiceUnavailable, TooManyRequests
from server.metrics import DRAINING

logger = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, max_waiting_requests: int, retry_after_s: int) -> None:
        self.max_waiting_requests = max_waiting_requests
        self.retry_after_s = retry_after_s
        self.draining = False
        self.in_flight = 0  # admitted HTTP generation requests not yet answered
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, new_engine_requests: int, pending: int, capacity: int) -> None:
        """Refuse work while draining (503) or when the engine's queue would exceed its bound (429).

        `pending` engine requests are submitted and unfinished; the engine runs at most
        `capacity` at once, so the rest wait.
        """
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.", code="draining")
        waiting = max(0, pending + new_engine_requests - capacity)
        if waiting > self.max_waiting_requests:
            raise TooManyRequests(
                f"The server is overloaded ({waiting} requests would wait, over the bound of "
                f"{self.max_waiting_requests}); retry later.", retry_after_s=self.retry_after_s)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def track(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """A streamed response that counts as in flight (see `enter`) until it ends or is dropped."""
        try:
            async for item in stream:
                yield item
        finally:
            self.leave()

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
