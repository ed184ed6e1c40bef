"""FastAPI application factory: routes, error envelope, and the engine's lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from guidance.catalog import GuideCatalog
from guidance.loading import check_tokenizers
from server.api.chat.router import router as chat_router
from server.api.completions.router import router as completions_router
from server.api.guidance import router as guidance_router
from server.api.health import router as health_router
from server.api.models import router as models_router
from server.engine import Engine
from server.errors import install_error_handlers
from server.prompts import PromptRenderer
from server.services import Services
from server.settings import Settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, start_engine: Callable[[Settings, GuideCatalog], Engine] = Engine.start
) -> FastAPI:
    """The HTTP app; its lifespan starts the engine before the first request and stops it after the last."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        renderer = PromptRenderer.load(settings.model)
        catalog = GuideCatalog.from_paths(settings.guide_model_paths())
        check_tokenizers(settings.model, catalog)
        engine = start_engine(settings, catalog)
        app.state.services = Services(settings, engine, renderer, catalog, created=int(time.time()))
        logger.info("serving %s from %s", settings.model_name, settings.model)
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="alignserve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for router in (health_router, models_router, guidance_router, completions_router, chat_router):
        app.include_router(router)
    return app
