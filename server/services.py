"""What request handlers need, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from server.engine import Engine
from server.errors import ModelNotFound
from server.prompts import PromptRenderer
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    renderer: PromptRenderer
    created: int

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ModelNotFound(model)


def get_services(request: Request) -> Services:
    """FastAPI dependency: the running app's services."""
    return request.app.state.services
