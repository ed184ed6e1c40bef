"""A dump of where the server is: its in-flight requests by stage, and every asyncio task with the
chain of coroutines it is suspended in (`GET /debug/requests`, and the log on SIGUSR1)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
from types import CoroutineType, FrameType
from typing import Any

from server.tracking import RequestTracker

logger = logging.getLogger(__name__)

MAX_AWAIT_DEPTH = 32


def _frame_location(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})"


def _awaiting(awaitable: Any) -> Any:
    """What a coroutine, async generator or generator is suspended on (None at the bottom)."""
    for attribute in ("cr_await", "ag_await", "gi_yieldfrom"):
        if hasattr(awaitable, attribute):
            return getattr(awaitable, attribute)
    if type(awaitable).__name__ in ("async_generator_asend", "async_generator_athrow"):
        # `anext(generator)` in progress: the step object exposes its generator only to the garbage collector.
        return next((r for r in gc.get_referents(awaitable) if inspect.isasyncgen(r)), None)
    return None


def await_chain(coroutine: CoroutineType) -> list[str]:
    """The coroutines (and async generators) a task's coroutine is suspended in, outermost first, each as
    `qualified name (file:line)`; the innermost non-coroutine awaitable (a future) closes the chain."""
    chain: list[str] = []
    awaitable: Any = coroutine
    while awaitable is not None and len(chain) < MAX_AWAIT_DEPTH:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None) \
            or getattr(awaitable, "gi_frame", None)
        location = _frame_location(frame)
        if location is not None or not type(awaitable).__name__.startswith("async_generator_a"):
            chain.append(location if location is not None else type(awaitable).__qualname__)
        awaitable = _awaiting(awaitable)
    return chain


def task_dump() -> list[dict]:
    """Every task of the running loop: its name and where it is suspended."""
    return sorted(({"name": task.get_name(), "done": task.done(), "awaiting": await_chain(task.get_coro())}
                   for task in asyncio.all_tasks()), key=lambda t: t["name"])


def state_dump(tracker: RequestTracker) -> dict:
    return {"requests": tracker.snapshot(), "tasks": task_dump()}


def log_state(tracker: RequestTracker) -> None:
    """The dump in the log (SIGUSR1): one line, JSON."""
    logger.warning("state dump: %s", json.dumps(state_dump(tracker), separators=(",", ":")))
