"""What request handlers need, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.spec import ResolvedGuidance, parse_guidance
from server.engine import Engine
from server.errors import InvalidRequest, ModelNotFound
from server.prompts import PromptRenderer
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    renderer: PromptRenderer
    catalog: GuideCatalog
    created: int

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ModelNotFound(model)

    def resolve_guidance(self, entries: list | None) -> list[ResolvedGuidance]:
        """A request's validated guidance list (empty when it asks for none)."""
        if not entries:
            return []
        try:
            return parse_guidance(entries, self.catalog, max_entries=self.settings.max_guidance_entries)
        except GuidanceError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc


def get_services(request: Request) -> Services:
    """FastAPI dependency: the running app's services."""
    return request.app.state.services
