"""The page (``/``), its script, style sheet and icon, and ``GET /health``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

import evidencemap
from evidencemap.server.routes.deps import ServiceDep
from evidencemap.server.schemas import Health

__all__ = ["ASSETS", "router"]

router = APIRouter()

ASSETS = {
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
"""URL path → (file under ``server/static``, media type)."""

_STATIC = resources.files("evidencemap.server").joinpath("static")
_PAGE = _STATIC.joinpath("index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    """The interactive page."""
    return HTMLResponse(_PAGE)


def _asset(body: bytes, kind: str) -> Callable[[], Awaitable[Response]]:
    """The handler of one of the page's files."""

    async def asset() -> Response:
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    return asset


for _path, (_name, _kind) in ASSETS.items():
    router.get(_path, include_in_schema=False)(_asset(_STATIC.joinpath(_name).read_bytes(), _kind))


@router.get("/health", response_model=Health, tags=["service"])
async def health(service: ServiceDep) -> Health:
    """Liveness: answers at once, also while explanations run."""
    return Health(
        status="ok",
        model=service.model_name,
        version=evidencemap.__version__,
        workers=service.config.workers,
        busy=service.pending,
    )
