"""What request handlers need, built once by the app's lifespan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.kl_budget import KLBudget
from guidance.kv_budget import GUIDE_KV_BLOCK_SIZE
from guidance.search.scorers import ScorerCatalog
from guidance.search.spec import SearchLimits, SearchParams, parse_search
from guidance.spec import ResolvedGuidance, parse_guidance
from server.cache.service import ResponseCache
from server.engine import Engine
from server.errors import InvalidRequest, ModelNotFound
from server.lifecycle import Lifecycle
from server.prompts import PromptRenderer
from server.search import Search
from server.settings import Settings
from server.tool_calls import ToolCalling
from server.tracking import RequestTracker


@dataclass
class Services:
    settings: Settings
    engine: Engine
    renderer: PromptRenderer
    catalog: GuideCatalog
    scorers: ScorerCatalog
    search: Search
    lifecycle: Lifecycle
    cache: ResponseCache
    tools: ToolCalling
    created: int
    tracker: RequestTracker

    def request_timeout(self, asked_s: float | None) -> float:
        """A request's deadline in seconds: `timeout_s` if it gave one (400 over the cap), else the default."""
        settings = self.settings
        if asked_s is None:
            return settings.request_timeout_s
        if asked_s > settings.max_request_timeout_s:
            raise InvalidRequest(f"timeout_s must be at most {settings.max_request_timeout_s:g}, got {asked_s:g}.",
                                 param="timeout_s")
        return asked_s

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ModelNotFound(model)

    def admit(self, engine_requests: int, guide_blocks: Mapping[str, int]) -> None:
        """Backpressure and draining: raise 429 / 503 before any work is queued; 400 for a request
        that needs more of a guide model's KV blocks than its whole budget."""
        for name, blocks in guide_blocks.items():
            budget = self.lifecycle.guide_kv_blocks.get(name)
            if budget is not None and blocks > budget:
                raise InvalidRequest(
                    f"This request may fill {blocks} KV-cache blocks of guide model {name!r} ({GUIDE_KV_BLOCK_SIZE} "
                    f"tokens each: prompt + max_tokens per choice and candidate), more than its whole budget of "
                    f"{budget} (--guide-kv-cache-space-gib); lower max_tokens, n or the search's candidates.",
                    param="max_tokens")
        self.lifecycle.admit(engine_requests, self.engine.max_num_seqs, guide_blocks)

    def check_max_tokens(self, max_tokens: int | None, param: str) -> None:
        limit = self.settings.max_tokens_limit
        if limit is not None and max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"{param} must be at most {limit}, got {max_tokens}.", param=param)

    def resolve_guidance(self, entries: list | None, budget: KLBudget | None = None) -> list[ResolvedGuidance]:
        """A request's validated guidance list (empty when it asks for none) under its own KL `budget`."""
        if not entries and budget is None:
            return []
        try:
            return parse_guidance(entries or [], self.catalog, max_entries=self.settings.max_guidance_entries,
                                  budget=budget)
        except GuidanceError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc

    def check_search_fits(self, search: SearchParams | None, prompt_tokens: int, max_tokens: int,
                          param: str) -> None:
        """A model scorer (and a pruning one) must fit the prompt and the longest completion; 400 naming
        `param` otherwise."""
        if search is None:
            return
        prune = getattr(search, "prune", None)
        for scorer in (search.scorer, *([prune.scorer] if prune else [])):
            limit = self.scorers[scorer].max_length
            if limit is not None and prompt_tokens + max_tokens > limit:
                raise InvalidRequest(
                    f"The scorer {scorer!r} scores at most {limit} tokens; this request may need "
                    f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} for the completion).",
                    param=param)

    def resolve_search(self, entry: dict | None) -> SearchParams | None:
        """A request's validated search spec (None when it asks for none)."""
        if entry is None:
            return None
        settings = self.settings
        limits = SearchLimits(settings.max_search_candidates, settings.max_block_tokens)
        try:
            return parse_search(entry, self.scorers.names(), limits, prefix_scorers=self.scorers.prefix_names(),
                                reference_scorers=self.scorers.reference_names(),
                                step_scorers=self.scorers.step_names())
        except GuidanceError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc


async def get_services(request: Request) -> Services:
    """FastAPI dependency: the running app's services (async: FastAPI runs a plain function in a thread)."""
    return request.app.state.services
