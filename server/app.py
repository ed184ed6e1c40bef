"""FastAPI application factory: routes, middleware, error envelope, and the engine's lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from guidance.adapters.vllm import resolve_guide_dtype
from guidance.catalog import GuideCatalog
from guidance.kv_budget import guide_kv_capacity, guide_kv_plans
from guidance.loading import check_tokenizers
from guidance.search.scorers import ScorerCatalog
from server.api.chat.router import router as chat_router
from server.api.completions.router import router as completions_router
from server.api.guidance import router as guidance_router
from server.api.health import router as health_router
from server.api.metrics import router as metrics_router
from server.api.models import router as models_router
from server.api.tokenize import router as tokenize_router
from server.cache.service import ResponseCache
from server.engine import Engine
from server.errors import install_error_handlers
from server.lifecycle import Lifecycle
from server.middleware import ApiKeyAuth, BodySizeLimit, RequestOutcomes
from server.prompts import PromptRenderer
from server.tool_calls import ToolCalling
from server.search import Search
from server.services import Services
from server.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/version"})


def create_app(
    settings: Settings, start_engine: Callable[[Settings, GuideCatalog], Engine] = Engine.start
) -> FastAPI:
    """The HTTP app; its lifespan starts the engine before the first request and stops it after the last.

    `app.state.lifecycle` is the drain switch the CLI flips on SIGTERM.
    """
    lifecycle = Lifecycle(settings.max_waiting_requests, settings.retry_after_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        renderer = PromptRenderer.load(settings.model)
        catalog = GuideCatalog.from_paths(settings.guide_model_paths())
        check_tokenizers(settings.model, catalog)
        scorers = ScorerCatalog.load(catalog)
        cache = ResponseCache.from_settings(settings, catalog.paths_by_name())
        engine = start_engine(settings, catalog)
        # The worker sizes the guide caches by the same budget and dtype (guidance.adapters.vllm).
        guide_dtype = resolve_guide_dtype(settings.guide_dtype, engine.model_dtype)
        plans = guide_kv_plans(catalog, guide_dtype, settings.guide_kv_cache_space_gib, engine.max_num_seqs,
                               engine.max_model_len)
        lifecycle.budget_guide_kv(guide_kv_capacity(plans))
        for plan in plans:
            logger.info(plan.describe())
        tools = ToolCalling.load(settings.tool_call_parser, settings.enable_auto_tool_choice, renderer.tokenizer)
        search = Search(engine, scorers, renderer.decode)
        app.state.services = Services(settings, engine, renderer, catalog, scorers, search, lifecycle, cache, tools,
                                      created=int(time.time()))
        logger.info("serving %s from %s (cache: %s)", settings.model_name, settings.model,
                    cache.backend.name if cache.backend else "off")
        try:
            yield
        finally:
            await cache.close()
            engine.shutdown()

    app = FastAPI(title="alignserve", version="0.1.0", lifespan=lifespan)
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    for router in (health_router, metrics_router, models_router, tokenize_router, guidance_router, completions_router,
                   chat_router):
        app.include_router(router)
    # Added last = outermost: the body limit and key check run before anything else.
    app.add_middleware(RequestOutcomes)
    if settings.api_key_list:
        open_paths = OPEN_PATHS if settings.auth_metrics else OPEN_PATHS | {"/metrics"}
        app.add_middleware(ApiKeyAuth, keys=settings.api_key_list, open_paths=open_paths)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
