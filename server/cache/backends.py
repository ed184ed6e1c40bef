"""Cache backends. Both fail open: a backend error is reported to the caller, never raised."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Protocol

logger = logging.getLogger(__name__)


class CacheBackend(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None:
        """The stored value, or None on a miss. Raises on a backend failure."""

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store with a time to live. Raises on a backend failure."""

    async def close(self) -> None: ...


class MemoryBackend:
    """A bounded LRU map with per-entry expiry, local to this process."""

    name = "memory"

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisBackend:
    """Redis (redis-py asyncio, one client for the app). Short timeouts and no retries; after a
    failure Redis is skipped for `cooldown_s`, so an outage costs one timeout per cooldown, not
    one per request, and caching resumes by itself when Redis is back."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float, cooldown_s: float) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        )
        self._cooldown_s = cooldown_s
        self._skip_until = 0.0
        self._timeout_s = timeout_s

    async def get(self, key: str) -> bytes | None:
        return await self._call(self._client.get(key))

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call(self._client.set(key, value, ex=ttl_s))

    async def _call(self, command):
        if time.monotonic() < self._skip_until:
            command.close()  # never awaited: Redis is cooling down
            raise ConnectionError("redis skipped after a recent failure")
        try:
            # The socket timeout bounds each read; this bounds the whole command.
            return await asyncio.wait_for(command, self._timeout_s * 2)
        except Exception:
            self._skip_until = time.monotonic() + self._cooldown_s
            raise

    async def close(self) -> None:
        await self._client.aclose()
