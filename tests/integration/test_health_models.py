"""/health, /ready and /v1/models."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def test_health_and_ready(http, model_name):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": model_name}


def test_models_list_and_retrieve(openai_client, model_name):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [model_name]
    model = openai_client.models.retrieve(model_name)
    assert model.id == model_name and model.object == "model"
    assert model.max_model_len == 512
