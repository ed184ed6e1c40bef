"""Responses kept for GET /v1/responses/{id} and `previous_response_id`.

A response made with `store: true` (the default, as in OpenAI's API) is kept in this process's memory:
the newest `max_entries` of them, the least recently used dropped first. So a stored response is
found only on the replica that made it (behind a load balancer: with session affinity), and not
after a restart. With `max_entries` 0 nothing is kept, and `store` is ignored as vLLM ignores it
without VLLM_ENABLE_RESPONSES_API_STORE.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Request


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # as it was answered (JSON)
    conversation: list[dict[str, Any]]  # the messages it was prompted with, in vLLM's form (chat messages)


class ResponseStore:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def put(self, stored: StoredResponse) -> None:
        if not self.enabled:
            return
        response_id = stored.response["id"]
        self._entries[response_id] = stored
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def __len__(self) -> int:
        return len(self._entries)


def get_response_store(request: Request) -> ResponseStore:
    return request.app.state.response_store
