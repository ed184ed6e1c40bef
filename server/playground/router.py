"""GET /playground/: the playground page and its two assets, served from the package's `static/` folder.

The files are fixed and few, so each has its own route (no directory serving). They hold no data: the
page calls the API with the key its user enters, so with `--api-keys` they are open paths and the API
calls they make are checked as any other (`PLAYGROUND_PATHS`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/playground/"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
PLAYGROUND_PATHS = frozenset({PREFIX.rstrip("/"), PREFIX, *(PREFIX + name for name in ASSETS)})
# The page's scripts and styles come from this server only: nothing external can load or run. no-cache: after
# an upgrade the browser revalidates, so it never runs an old script against the new API.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get(PREFIX.rstrip("/"))
async def playground_redirect() -> RedirectResponse:
    # The page refers to its assets and the API by relative URLs, which resolve from the folder.
    return RedirectResponse(PREFIX)


@router.get(PREFIX)
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=HEADERS)


def _asset_route(name: str, media_type: str) -> None:
    async def asset() -> FileResponse:
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)

    router.add_api_route(PREFIX + name, asset, methods=["GET"], name=f"playground_{name}")


for _name, _media_type in ASSETS.items():
    _asset_route(_name, _media_type)
