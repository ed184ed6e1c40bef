"""The response cache as the endpoints use it: which requests, which key, get and store."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from guidance.search.spec import SearchParams
from guidance.spec import ResolvedGuidance
from server.cache.backends import CacheBackend, MemoryBackend, RedisBackend
from server.cache.keys import cache_key, model_revision
from server.metrics import CACHE_REQUESTS

logger = logging.getLogger(__name__)


class ResponseCache:
    def __init__(self, backend: CacheBackend | None, namespace: str, ttl_s: int,
                 model_name: str, model_revision_id: str, guide_revisions: dict[str, str]) -> None:
        self.backend = backend
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._model = {"name": model_name, "revision": model_revision_id}
        self._guide_revisions = guide_revisions

    @classmethod
    def from_settings(cls, settings, guide_paths: dict[str, Path],
                      remote_scorers: Mapping[str, str] | None = None) -> "ResponseCache":
        """`remote_scorers`: {name: identity} of the scorers served by URL (their endpoint and model)."""
        backend: CacheBackend | None = None
        if settings.cache == "on":
            backend = (RedisBackend(settings.redis_url, settings.redis_timeout_s, settings.redis_cooldown_s)
                       if settings.redis_url else MemoryBackend(settings.cache_max_entries))
        return cls(backend, settings.cache_namespace, settings.cache_ttl_s, settings.model_name,
                   model_revision(settings.model),
                   {**{name: model_revision(p) for name, p in guide_paths.items()}, **(remote_scorers or {})})

    def key_for(self, endpoint: str, body, guidance: list[ResolvedGuidance],
                search: SearchParams | None = None) -> str | None:
        """The key of a cacheable request, None for one that must not be cached.

        Only deterministic requests are cached: temperature 0 or an explicit seed, and a
        search that keeps the best candidate (selection temperature 0) or has that seed.
        """
        if self.backend is None:
            return None
        deterministic = (body.temperature == 0 or body.seed is not None) and (
            search is None or search.temperature == 0 or body.seed is not None)
        if not deterministic or body.cache is False:
            CACHE_REQUESTS.labels(self.backend.name, "bypass").inc()
            return None
        identity = {
            "model": self._model,
            "guide_models": {name: self._guide_revisions[name] for g in guidance for name in g.models},
            "guidance": [g.describe() for g in guidance],
        }
        if search is not None:
            # A model scorer is identified by its weights, a remote one by its endpoint and model; a verifier
            # (code) by its name.
            identity["scorer"] = {"name": search.scorer, "revision": self._guide_revisions.get(search.scorer)}
            if (prune := getattr(search, "prune", None)) is not None:
                identity["prune_scorer"] = {"name": prune.scorer, "revision": self._guide_revisions[prune.scorer]}
        return cache_key(self.namespace, identity, endpoint, body.model_dump(mode="json"))

    async def lookup(self, key: str) -> dict | None:
        backend = self.backend
        try:
            value = await backend.get(key)
        except Exception as exc:
            CACHE_REQUESTS.labels(backend.name, "error").inc()
            logger.debug("cache get failed: %s", exc)
            return None
        CACHE_REQUESTS.labels(backend.name, "miss" if value is None else "hit").inc()
        return None if value is None else json.loads(value)

    async def store(self, key: str, response: dict) -> None:
        backend = self.backend
        try:
            await backend.set(key, json.dumps(response, separators=(",", ":")).encode(), self.ttl_s)
        except Exception as exc:
            CACHE_REQUESTS.labels(backend.name, "error").inc()
            logger.debug("cache set failed: %s", exc)
            return
        CACHE_REQUESTS.labels(backend.name, "store").inc()

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
