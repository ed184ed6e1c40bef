"""What the two generation endpoints share: running choices, streaming, caching, admission.

An endpoint supplies a `GenerationServing` subclass (how to validate its request and
how its responses and chunks look); `serve` does the rest: a cache lookup, admission
(429/503), counting the request in flight for draining, the engine run, streamed or
not, aborting on disconnect, and storing the response for deterministic requests.
"""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from guidance.kl_budget import KLBudget
from guidance.kv_budget import request_blocks
from guidance.search.scorers import Conversation
from guidance.search.spec import SearchParams
from guidance.spec import ResolvedGuidance
from server.api.choices import ChoiceCollector, usage, with_token_ids
from server.api.common import SamplingRequest
from server.api.streaming import SSE_DONE, EventStream, cancel_on_disconnect, sse
from server.engine import ChoiceDelta, ChoiceOutput, SamplingOptions
from server.errors import APIError, api_error_body
from server.services import Services
from server.streams import merge, tagged
from server.tracking import TrackedRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: list[int]
    text: str
    options: SamplingOptions
    conversation: Conversation | None = None  # a chat request's messages, for scorers that read them


@dataclass
class Prepared:
    """A validated request: its prompts, ready for the engine, its guidance (its own KL budget folded in),
    its search, and the KL budget it gave itself."""

    prompts: list[PreparedPrompt]
    guidance: list[ResolvedGuidance] = field(default_factory=list)
    search: SearchParams | None = None
    budget: KLBudget | None = None
    prompt_only: bool = False  # score the prompts (echo, max_tokens 0): drop the one generated token

    @property
    def engine_requests(self) -> int:
        """Engine requests the request runs at once (a search runs its candidates together)."""
        per_choice = 1 if self.search is None else self.search.candidates_per_pick
        return sum(p.options.n for p in self.prompts) * per_choice

    @property
    def guide_blocks(self) -> dict[str, int]:
        """Blocks of each guide model's KV cache its engine requests may fill (guidance.kv_budget)."""
        models = sorted({name for g in self.guidance if g.params.strength > 0 for name in g.models})
        per_choice = 1 if self.search is None else self.search.candidates_per_pick
        return request_blocks(models, [(p.options.n * per_choice, len(p.token_ids) + p.options.max_tokens)
                                       for p in self.prompts])

    @property
    def reports(self) -> bool:
        """Whether each choice carries a `guidance` object."""
        return bool(self.guidance) or self.search is not None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    def guidance_summary(self) -> dict:
        """The response's `guidance` object: the resolved guidance entries (each bound the tighter of its own
        and the request's), the request's own KL bounds as it gave them, and the search."""
        summary: dict = {"entries": [g.describe() for g in self.guidance]}
        if self.budget is not None:
            summary.update({name: value for name, value in self.budget.as_dict().items() if value is not None})
        if self.search is not None:
            summary["search"] = self.search.model_dump(exclude_none=True)
        return summary


class GenerationServing(ABC):
    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, services: Services) -> None:
        self.services = services

    @property
    def endpoint(self) -> str:
        """The endpoint the request tracker names for a request (/debug/requests, logs)."""
        return self.object

    @abstractmethod
    def prepare(self, body: SamplingRequest) -> Prepared:
        """Validate the request against the model and settings; every error is a 4xx APIError."""

    @abstractmethod
    def choice(self, body: SamplingRequest, prepared: Prepared, index: int, choice: ChoiceOutput) -> dict:
        """One whole choice of a response."""

    @abstractmethod
    def chunk_choice(self, body: SamplingRequest, prepared: Prepared, index: int, delta: ChoiceDelta,
                     previous_text: str | None) -> dict:
        """One streamed delta; `previous_text` is the choice's text before it (None for its first delta)."""

    @abstractmethod
    def replay_choices(self, body: SamplingRequest, choice: dict) -> list[dict]:
        """A cached whole choice as the chunk choices a stream would have sent."""

    def opening_choices(self, body: SamplingRequest, prepared: Prepared) -> list[dict]:
        """Chunk choices sent before any token (chat announces the assistant role)."""
        return []

    def prompt_fields(self, body: SamplingRequest, prepared: Prepared) -> dict:
        """Response-level fields about the prompt, also sent on the opening chunks (chat: its token ids)."""
        return {}

    async def deltas(self, prepared: Prepared, record: TrackedRequest) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """Deltas of every prompt's choices, keyed by the response's choice index, under the request's
        deadline (server.tracking); `record` is the request's, and its id the stem of its engine request ids."""
        streams = [
            tagged(i * prompt.options.n, self._generate(f"{record.id}-{i}", prompt, prepared.search))
            for i, prompt in enumerate(prepared.prompts)
        ]
        async for offset, delta in record.bounded(merge(streams)):
            if prepared.prompt_only:
                delta = replace(delta, text="", token_ids=(), logprobs=() if delta.logprobs is not None else None)
            yield offset + delta.index, delta

    def _generate(self, request_id: str, prompt: PreparedPrompt, search: SearchParams | None
                  ) -> AsyncIterator[ChoiceDelta]:
        services = self.services
        if search is None:
            return services.engine.generate(request_id, prompt.token_ids, prompt.options)
        prompt_text = services.renderer.decode(prompt.token_ids)
        return services.search.generate(request_id, prompt.token_ids, prompt_text, prompt.options, search,
                                        prompt.conversation)

    def response(self, body: SamplingRequest, prepared: Prepared, collector: ChoiceCollector,
                 request_id: str, created: int) -> dict:
        response = {
            "id": request_id,
            "object": self.object,
            "created": created,
            "model": body.model,
            "choices": [with_token_ids(self.choice(body, prepared, index, choice), choice.token_ids,
                                       body.return_token_ids) for index, choice in collector.sorted()],
            "usage": usage(prepared.prompt_tokens, collector.completion_tokens),
            **self.prompt_fields(body, prepared),
        }
        if prepared.reports:
            response["guidance"] = prepared.guidance_summary()
        return response

    def _chunk(self, body: SamplingRequest, request_id: str, created: int, choices: list[dict]) -> dict:
        return {"id": request_id, "object": self.chunk_object, "created": created, "model": body.model,
                "choices": choices}

    def _opening_chunks(self, body: SamplingRequest, prepared: Prepared, request_id: str, created: int
                        ) -> Iterator[str]:
        fields = self.prompt_fields(body, prepared)
        for choice in self.opening_choices(body, prepared):
            yield sse({**self._chunk(body, request_id, created, [choice]), **fields})

    def _new_id(self, body: SamplingRequest) -> tuple[str, int]:
        """The response's id, named after the client's request id as vLLM's server names it, and its time."""
        return f"{self.id_prefix}-{body.request_id}", int(time.time())

    async def complete(self, body: SamplingRequest, prepared: Prepared, record: TrackedRequest) -> dict:
        request_id, created = self._new_id(body)
        collector = ChoiceCollector()
        async for index, delta in self.deltas(prepared, record):
            collector.add(index, delta)
        return self.response(body, prepared, collector, request_id, created)

    async def stream(self, body: SamplingRequest, prepared: Prepared, cache_key: str | None,
                     record: TrackedRequest) -> AsyncIterator[str]:
        request_id, created = self._new_id(body)
        collector = ChoiceCollector()
        try:
            for chunk in self._opening_chunks(body, prepared, request_id, created):
                yield chunk
            async for index, delta in self.deltas(prepared, record):
                previous = collector.choices.get(index)
                previous_text = None if previous is None else previous.text
                collector.add(index, delta)
                choice = with_token_ids(self.chunk_choice(body, prepared, index, delta, previous_text),
                                        delta.token_ids, body.return_token_ids)
                yield sse(self._chunk(body, request_id, created, [choice]))
            if body.include_usage_in_stream:
                yield sse({**self._chunk(body, request_id, created, []),
                           "usage": usage(prepared.prompt_tokens, collector.completion_tokens)})
            if cache_key is not None:
                await self.services.cache.store(cache_key, self.response(body, prepared, collector, request_id, created))
        except APIError as exc:
            yield self.error_event(exc)
        except Exception:  # the engine or a scorer failed mid-stream: end the stream with an error event
            logger.exception("streamed request %s failed", request_id)
            yield self.error_event(APIError("Internal server error."))
        yield SSE_DONE

    def error_event(self, error: APIError) -> str:
        """The event that tells a streaming client its request failed (the status line was sent already)."""
        return sse(api_error_body(error))

    async def replay(self, body: SamplingRequest, prepared: Prepared, cached: dict) -> AsyncIterator[str]:
        """A cached response sent as the stream that produced it would have looked."""
        request_id, created = self._new_id(body)
        for chunk in self._opening_chunks(body, prepared, request_id, created):
            yield chunk
        for choice in cached["choices"]:
            for chunk_choice in self.replay_choices(body, choice):
                yield sse(self._chunk(body, request_id, created, [chunk_choice]))
        if body.include_usage_in_stream:
            yield sse({**self._chunk(body, request_id, created, []), "usage": cached["usage"]})
        yield SSE_DONE

    async def serve(self, request: Request, body: SamplingRequest) -> Response:
        services = self.services
        if (header_id := request.headers.get("X-Request-Id")) is not None:
            body = body.model_copy(update={"request_id": header_id})  # vLLM's server prefers the header
        prepared = self.prepare(body)
        for prompt in prepared.prompts:
            services.engine.check_options(prompt.options)
        cache_key = services.cache.key_for(self.object, body, prepared.guidance, prepared.search)
        cached = await services.cache.lookup(cache_key) if cache_key is not None else None
        if cached is not None:
            if body.stream:
                return EventStream(self.replay(body, prepared, cached))
            request_id, created = self._new_id(body)
            return JSONResponse({**cached, "id": request_id, "created": created})
        timeout_s = services.request_timeout(body.timeout_s)
        engine_requests, guide_blocks = prepared.engine_requests, prepared.guide_blocks
        services.admit(engine_requests, guide_blocks)
        lifecycle, tracker = services.lifecycle, services.tracker
        # Engine request ids are our own, not the client's: two requests may carry the same X-Request-Id.
        record = tracker.open(f"{self.id_prefix}-{uuid.uuid4().hex}", self.endpoint, bool(body.stream), timeout_s)

        def release() -> None:
            tracker.close(record)
            lifecycle.release(engine_requests, guide_blocks)

        if body.stream:
            return EventStream(self.stream(body, prepared, cache_key, record), release)
        try:
            result = await cancel_on_disconnect(request, self.complete(body, prepared, record))
        finally:
            release()
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if cache_key is not None:
            await services.cache.store(cache_key, result)
        return JSONResponse(result)
