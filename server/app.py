"""FastAPI application factory: routes, middleware, error envelope, and the engine's lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from guidance.adapters.vllm import resolve_guide_dtype
from guidance.catalog import GuideCatalog
from guidance.kv_budget import guide_kv_capacity, guide_kv_plans
from server.api.chat.router import router as chat_router
from server.api.completions.router import router as completions_router
from server.api.debug import DEBUG_PATH
from server.api.debug import router as debug_router
from server.api.guidance import router as guidance_router
from server.api.health import router as health_router
from server.api.messages.router import router as messages_router
from server.api.metrics import router as metrics_router
from server.api.models import router as models_router
from server.api.responses.router import router as responses_router
from server.api.responses.store import ResponseStore
from server.api.tokenize import router as tokenize_router
from server.cache.keys import model_revision
from server.cache.service import ResponseCache
from server.engine import Engine
from server.diagnostics import log_state
from server.errors import EngineDead, install_error_handlers
from server.lifecycle import Lifecycle
from server.metrics import ENGINE_ALIVE, REMOTE_SCORER_ATTEMPTS, REQUEST_STAGES
from server.middleware import ApiKeyAuth, BodySizeLimit, RequestOutcomes
from server.playground.router import PLAYGROUND_PATHS
from server.playground.router import router as playground_router
from server.prompts import PromptRenderer
from server.tool_calls import ToolCalling
from server.search import Search
from server.services import Services
from server.settings import Settings
from server.table_scorers import load_table_scorers
from server.tracking import RequestTracker, Stage

logger = logging.getLogger(__name__)

# The playground's page and assets are open: its API calls carry the key its user enters.
OPEN_PATHS = frozenset({"/health", "/ready", "/version"}) | PLAYGROUND_PATHS


async def watch_engine(engine: Engine, tracker: RequestTracker, lifecycle: Lifecycle, interval_s: float = 0.5
                       ) -> None:
    """When vLLM's engine core dies, or stops answering after a call to its workers timed out (it waits for
    their replies between steps, so a lost reply stops it for good): end every in-flight request with 503
    engine_dead, refuse new ones, and have the server exit non-zero for its supervisor to restart it
    (/health and /ready answer 503 meanwhile)."""
    ENGINE_ALIVE.set(1)
    while True:
        await asyncio.sleep(interval_s)
        if not engine.alive:
            reason = "the engine core exited"
            break
        if engine.rpc_timed_out and not await engine.responds():
            reason = f"the engine core did not answer within {engine.rpc_timeout_s:g} s after a worker call timed out"
            break
    ENGINE_ALIVE.set(0)
    lifecycle.engine_died()
    ended = tracker.end_all(EngineDead)
    logger.error("the engine died (%s): %d in-flight requests ended with 503 engine_dead; exiting for a restart",
                 reason, ended)


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
        loaded = load_table_scorers(settings, os.environ)
        catalog, scorers, remote, reward_models = loaded.catalog, loaded.scorers, loaded.remote, loaded.reward_models
        REMOTE_SCORER_ATTEMPTS.scorers = remote
        # A reward model is identified by its weights and how it reads them, a remote one by its endpoint.
        cache = ResponseCache.from_settings(settings, catalog.paths_by_name(),
                                            {**{s.name: s.identity() for s in remote},
                                             **{s.name: f"{model_revision(s.spec.path)} {s.identity()}"
                                                for s in reward_models}})
        engine = start_engine(settings, catalog)
        # The worker sizes the guide caches by the same budget and dtype (guidance.adapters.vllm).
        guide_dtype = resolve_guide_dtype(settings.guide_dtype, engine.model_dtype)
        plans = guide_kv_plans(catalog, guide_dtype, settings.guide_kv_cache_space_gib, engine.max_num_seqs,
                               engine.max_model_len)
        lifecycle.budget_guide_kv(guide_kv_capacity(plans))
        for plan in plans:
            logger.info(plan.describe())
        tools = ToolCalling.load(settings.tool_call_parser, settings.enable_auto_tool_choice, renderer.tokenizer)
        search = Search(engine, scorers, renderer.decode, settings.scorer_timeout_s)
        tracker = RequestTracker(settings.stall_timeout_s, engine.holds)
        REQUEST_STAGES.follow([stage.value for stage in Stage], tracker.snapshot)
        app.state.services = Services(settings, engine, renderer, catalog, scorers, search, lifecycle, cache, tools,
                                      created=int(time.time()), tracker=tracker)
        logger.info("serving %s from %s (cache: %s)", settings.model_name, settings.model,
                    cache.backend.name if cache.backend else "off")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, log_state, tracker)
        watchers = [asyncio.create_task(tracker.watch(), name="request watchdog"),
                    asyncio.create_task(watch_engine(engine, tracker, lifecycle), name="engine watch")]
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            for watcher in watchers:
                watcher.cancel()
            await cache.close()
            loaded.close()
            engine.shutdown()

    app = FastAPI(title="alignserve", version="0.1.0", lifespan=lifespan)
    app.state.lifecycle = lifecycle
    app.state.response_store = ResponseStore(settings.responses_store_max_entries)
    install_error_handlers(app)
    for router in (health_router, metrics_router, models_router, tokenize_router, guidance_router, completions_router,
                   chat_router, messages_router, responses_router, playground_router):
        app.include_router(router)
    if settings.debug_key:
        app.include_router(debug_router)
    # Added last = outermost: the body limit and key check run before anything else.
    app.add_middleware(RequestOutcomes)
    if settings.api_key_list:
        # The debug route checks the operator's debug key itself.
        open_paths = OPEN_PATHS | {DEBUG_PATH} if settings.auth_metrics else OPEN_PATHS | {"/metrics", DEBUG_PATH}
        app.add_middleware(ApiKeyAuth, keys=settings.api_key_list, open_paths=open_paths)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
