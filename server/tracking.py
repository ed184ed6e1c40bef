"""Where every in-flight request is, its deadline, and the watchdog that ends the stuck ones.

Each admitted generation request is a `TrackedRequest` from admission to its last byte. Code
deep in the pipeline (the engine wrapper, the search) marks what the request is waiting for with
`stage(...)`, through a context variable, so no signature carries the record:

    admitted        admitted; no engine output awaited yet
    running         waiting for the engine's next output (queued or generating there)
    waiting_report  a finished guided choice waits for its KL report from the engine's worker
    scoring         a search waits for its scorer
    streaming       between engine outputs of a streamed request: writing a chunk to the client

Choices run concurrently, so several stages may be active at once; a request shows the one it is
most blocked on (scoring, then waiting_report, then running).

Two things end a request that would otherwise never end, each with a 503 whose code names it:

- its **deadline** (`deadline_exceeded`): every await on the request's stream runs under an
  `asyncio.timeout` at the deadline;
- the **watchdog** (`request_stalled`): a request that made no progress (no engine output, no stage
  change) for `stall_timeout_s` while the engine holds none of its engine requests is waiting on
  something that will not come; it is ended at once and logged with the stage it was stuck in.

Both, and requests ended because the engine died (`engine_dead`), are counted in
`alignserve_requests_ended_total{reason}`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from server.errors import APIError, DeadlineExceeded, RequestStalled
from server.metrics import REQUESTS_ENDED

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Stage(str, Enum):
    ADMITTED = "admitted"
    RUNNING = "running"
    WAITING_REPORT = "waiting_report"
    SCORING = "scoring"
    STREAMING = "streaming"


# A request with several active stages shows the first of these.
_BLOCKING_ORDER = (Stage.SCORING, Stage.WAITING_REPORT, Stage.RUNNING)


@dataclass(eq=False)
class TrackedRequest:
    """One in-flight request: its stages, progress, engine requests and deadline (monotonic seconds)."""

    id: str
    endpoint: str
    stream: bool
    timeout_s: float
    started: float = field(default_factory=time.monotonic)
    engine_ids: set[str] = field(default_factory=set)
    failure: APIError | None = None  # why the request was ended, once it was
    _active: Counter[Stage] = field(default_factory=Counter)
    _stage_since: float = 0.0
    _last_progress: float = 0.0
    _outputs: int = 0
    _timeout: asyncio.Timeout | None = None
    _task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self._stage_since = self._last_progress = self.started

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    @property
    def stage(self) -> Stage:
        for stage in _BLOCKING_ORDER:
            if self._active[stage]:
                return stage
        return Stage.STREAMING if self.stream and self._outputs else Stage.ADMITTED

    def progress(self) -> None:
        """The engine produced output for this request."""
        self._outputs += 1
        self._last_progress = time.monotonic()

    def idle_seconds(self, now: float) -> float:
        return now - self._last_progress

    @contextmanager
    def in_stage(self, stage: Stage) -> Iterator[None]:
        before = self.stage
        self._active[stage] += 1
        self._moved(before)
        try:
            yield
        finally:
            before = self.stage
            self._active[stage] -= 1
            self._moved(before)

    def _moved(self, before: Stage) -> None:
        now = time.monotonic()
        self._last_progress = now
        if self.stage is not before:
            self._stage_since = now

    @asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """Await under the deadline; `end` cuts it short. Raises the reason the request was ended."""
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            async with asyncio.timeout_at(loop.time() + self.deadline - time.monotonic()) as timeout:
                self._timeout = timeout
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            if self.failure is None:
                self.end(DeadlineExceeded(f"The request did not finish within its deadline of {self.timeout_s:g} s "
                                          "(timeout_s)."))
            raise self.failure from None
        finally:
            self._timeout = None

    async def bounded(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """`stream`'s items, each awaited under the deadline, in the `running` stage and with this as the
        current request (the engine and the search mark their stages on it, also in the tasks they
        start); closing this closes `stream` (its engine requests are aborted)."""
        async with aclosing(stream):
            while True:
                async with self._bounded():
                    with self.in_stage(Stage.RUNNING), _as_current(self):
                        try:
                            item = await anext(stream)
                        except StopAsyncIteration:
                            return
                yield item

    def end(self, failure: APIError) -> None:
        """End the request with `failure`: the await it is blocked on is cut short at once; a request
        blocked outside one (writing to a client that does not read) has its task cancelled."""
        if self.failure is not None:
            return
        self.failure = failure
        REQUESTS_ENDED.labels(failure.code).inc()
        logger.warning("request %s (%s) ended: %s; stage %s for %.1f s, age %.1f s, engine requests: %s",
                       self.id, self.endpoint, failure.code, self.stage.value, time.monotonic() - self._stage_since,
                       time.monotonic() - self.started, ", ".join(sorted(self.engine_ids)) or "none")
        if self._timeout is not None:
            if not self._timeout.expired():
                self._timeout.reschedule(asyncio.get_running_loop().time())
        elif self._task is not None and not self._task.done():
            self._task.cancel()

    def describe(self, now: float, engine_holds: bool) -> dict:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "stage": self.stage.value,
            "age_s": round(now - self.started, 3),
            "stage_age_s": round(now - self._stage_since, 3),
            "idle_s": round(self.idle_seconds(now), 3),
            "deadline_in_s": round(self.deadline - now, 3),
            "engine_outputs": self._outputs,
            "engine_requests": sorted(self.engine_ids),
            "engine_holds": engine_holds,
            "ended": None if self.failure is None else self.failure.code,
        }


_current: contextvars.ContextVar[TrackedRequest | None] = contextvars.ContextVar("alignserve_request", default=None)


@contextmanager
def _as_current(record: TrackedRequest) -> Iterator[None]:
    token = _current.set(record)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def stage(name: Stage) -> Iterator[None]:
    """Mark the current request (if any) as being in stage `name` for the block."""
    record = _current.get()
    if record is None:
        yield
        return
    with record.in_stage(name):
        yield


def current_request() -> TrackedRequest | None:
    return _current.get()


def _holds_nothing(engine_ids: Iterable[str]) -> bool:
    return False


class RequestTracker:
    """The in-flight requests of this process, and the watchdog over them; `holds(engine ids)` says whether
    the engine holds any of them (server.engine.Engine.holds)."""

    def __init__(self, stall_timeout_s: float, holds: Callable[[Iterable[str]], bool] = _holds_nothing) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.holds = holds
        self._requests: dict[str, TrackedRequest] = {}

    def open(self, request_id: str, endpoint: str, stream: bool, timeout_s: float) -> TrackedRequest:
        record = TrackedRequest(request_id, endpoint, stream, timeout_s)
        self._requests[request_id] = record
        return record

    def close(self, record: TrackedRequest) -> None:
        self._requests.pop(record.id, None)

    def __iter__(self) -> Iterator[TrackedRequest]:
        return iter(list(self._requests.values()))

    def __len__(self) -> int:
        return len(self._requests)

    def snapshot(self) -> list[dict]:
        """Every in-flight request, oldest first."""
        now = time.monotonic()
        return [record.describe(now, self.holds(record.engine_ids)) for record in sorted(self, key=lambda r: r.started)]

    def stalled(self, now: float) -> list[TrackedRequest]:
        """Requests idle for `stall_timeout_s` or more of which the engine holds no request."""
        return [record for record in self if record.failure is None
                and record.idle_seconds(now) >= self.stall_timeout_s and not self.holds(record.engine_ids)]

    def end_all(self, failure: Callable[[], APIError]) -> int:
        """End every in-flight request (the engine died); how many there were."""
        records = [record for record in self if record.failure is None]
        for record in records:
            record.end(failure())
        return len(records)

    async def watch(self, interval_s: float = 1.0) -> None:
        """End stalled requests, every `interval_s`, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                stalled = self.stalled(time.monotonic())
            except Exception:  # a watchdog that died would let every later stall through
                logger.exception("request watchdog: checking for stalled requests failed")
                continue
            for record in stalled:
                record.end(RequestStalled(
                    f"The request made no progress for {self.stall_timeout_s:g} s while in stage "
                    f"'{record.stage.value}', and the engine holds none of its work; it was ended."))
