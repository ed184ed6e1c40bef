"""Async-iterator helpers: tagging and merging concurrent streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T")


async def tagged(tag: int, stream: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    async for item in stream:
        yield tag, item


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of several streams as they arrive; closing the merge cancels every stream."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(("item", item))
            await queue.put(("done", None))
        except Exception as exc:
            await queue.put(("error", exc))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "done":
                remaining -= 1
            else:
                raise value
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
