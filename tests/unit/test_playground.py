"""The playground's routes on a small app: the files, their types, and auth (the browser test runs the page)."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import OPEN_PATHS
from server.errors import install_error_handlers
from server.middleware import ApiKeyAuth
from server.playground.router import PLAYGROUND_PATHS, STATIC_DIR
from server.playground.router import router as playground_router


def make_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(playground_router)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    app.add_middleware(ApiKeyAuth, keys=["k1"], open_paths=OPEN_PATHS)
    return TestClient(app)


def test_page_and_assets_load_without_a_key_while_the_api_needs_one():
    client = make_client()
    assert PLAYGROUND_PATHS <= OPEN_PATHS
    page = client.get("/playground")  # redirected: the page's relative URLs resolve from the folder
    assert page.status_code == 200 and str(page.url).endswith("/playground/")
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert asset.text == (STATIC_DIR / name).read_text()
    assert client.get("/playground/index.html").status_code == 401  # no directory serving: only the routes above
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_page_refers_only_to_its_own_files():
    html = (STATIC_DIR / "index.html").read_text()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"app.js", "style.css", "data:,"}
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert "://" not in text and "@import" not in text and "url(" not in text, name
    assert {path.name for path in STATIC_DIR.iterdir()} == {"index.html", "app.js", "style.css"}
