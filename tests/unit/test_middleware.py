"""API-key and body-size middleware on a small app (the server tests cover them end to end)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from server.errors import install_error_handlers
from server.middleware import ApiKeyAuth, BodySizeLimit


def make_app(keys=("k1", "k2")) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    app.add_middleware(ApiKeyAuth, keys=list(keys), open_paths=frozenset({"/health"}))
    app.add_middleware(BodySizeLimit, max_bytes=100)
    return TestClient(app)


def test_keys():
    client = make_app()
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        response = client.post("/v1/echo", content=b"x", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    for key in ("k1", "k2"):
        assert client.post("/v1/echo", content=b"x", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_body_limit_declared_and_streamed():
    client = make_app()
    auth = {"Authorization": "Bearer k1"}
    assert client.post("/v1/echo", content=b"x" * 100, headers=auth).json() == {"size": 100}
    response = client.post("/v1/echo", content=b"x" * 101, headers=auth)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    streamed = client.post("/v1/echo", content=iter([b"x" * 60, b"x" * 60]), headers=auth)
    assert streamed.status_code == 413
