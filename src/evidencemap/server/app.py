"""The web service: ``create_app()`` builds a FastAPI app that explains uploaded photos.

Endpoints (every error is ``{"error": message}`` with a 4xx status, never a stack trace):

* ``POST /api/explain`` — multipart upload ``file`` + form fields ``method`` (comma-separated
  names), ``target`` (class index) or ``top_k``, ``options`` (JSON object) →
  :class:`~evidencemap.server.schemas.ExplainResponse`.
* ``GET /api/methods``, ``GET /api/models``, ``GET /api/labels``, ``GET /health``, ``GET /`` (the
  page, with ``/page.js``, ``/page.css`` and ``/favicon.svg``), and FastAPI's ``/openapi.json``
  and ``/docs``.
* ``GET /api/progress/{request_id}`` and ``POST /api/cancel/{request_id}``: the progress of a
  request sent with that ``request_id`` form field, and stopping it
  (:mod:`evidencemap.server.progress`).
* ``POST /api/download/npz``: one map of an answer as a ``.npz`` file.

The parts: the settings (:class:`~evidencemap.server.config.ServiceConfig`, checked once), the
service without HTTP (:class:`~evidencemap.server.service.Service`: the model, the lanes, the
limits and the explain flow), reading requests (:mod:`~evidencemap.server.forms`), writing
answers (:mod:`~evidencemap.server.render`) and the routes, one router per file
(:mod:`evidencemap.server.routes`). This module only wires them together.

The model is any :class:`~evidencemap.models.LoadedModel` of an image model: a built-in name or a
user model (TorchScript or pickled file, ``package.module:factory``, …; see
:func:`evidencemap.models.load`). Concurrency: one model is loaded per app and shared.
Explanations (decoding, forward, backward, PNG encoding) run in a pool of ``workers`` threads,
so the event loop stays free: ``/health`` and a fast Grad-CAM answer while a Score-CAM runs.
The library's hooks record only the calls of the thread that registered them, and
grad/inference mode are thread-local, so concurrent requests never see each other's
activations. The model must be in eval mode (it is, as loaded).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

import evidencemap
from evidencemap.models.loading import LoadedModel
from evidencemap.server.config import (
    COSTLY_PAUSE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TIME_LIMIT,
    MAX_TOP_K,
    ServiceConfig,
)
from evidencemap.server.errors import ApiError
from evidencemap.server.middleware import FORM_SLACK, BodyLimit, Guard, RefusalThrottle
from evidencemap.server.routes import ROUTERS
from evidencemap.server.service import Service, is_costly, load_served_model, method_options

__all__ = [
    "COSTLY_PAUSE",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_TIME_LIMIT",
    "MAX_TOP_K",
    "ApiError",
    "ServiceConfig",
    "create_app",
    "is_costly",
    "method_options",
]

logger = logging.getLogger("evidencemap.server")


def create_app(
    model_name: str | None = None,
    *,
    model: LoadedModel | nn.Module | None = None,
    config: ServiceConfig | None = None,
    **settings: Any,
) -> FastAPI:
    """Build the web service for one model.

    Args:
        model_name: a model spec (default ``efficientnet-lite0``), loaded once with
            :func:`evidencemap.models.load`: a built-in name (``evidencemap.models.builtin_names()``),
            a TorchScript or pickled model file, ``package.module:factory`` … (the default
            ImageNet preprocessing, no labels; load it yourself for others).
        model: an already loaded image model to serve instead: a
            :class:`~evidencemap.models.LoadedModel` (``evidencemap.models.load(spec,
            input_size=…, labels=…)``), or an ``nn.Module`` in eval mode (loaded with the
            defaults); ``model_name`` names it (default: its ``name``).
        config: the service's settings (:class:`~evidencemap.server.config.ServiceConfig`;
            default: every default).
        **settings: settings of :class:`~evidencemap.server.config.ServiceConfig` given one by
            one, over ``config``'s: ``workers``, ``costly_workers``, ``max_upload_bytes``,
            ``max_pixels``, ``max_pending``, ``display_size``, ``caps``, ``memory_budget``,
            ``time_limit``, ``allowed_origins``, ``refusal_delay``, ``refusal_allowance``,
            ``costly_niceness``, ``device``.

    Returns:
        The FastAPI application (serve it with uvicorn); ``app.state.service`` is its
        :class:`~evidencemap.server.service.Service`.

    Raises:
        TypeError / ValueError: for a bad setting or model, or a model whose weights are not
            installed.
    """
    config = config if config is not None else ServiceConfig()
    if model_name is not None:
        settings["model_name"] = model_name
    if settings:
        config = config.replace(**settings)
    service = Service(config, load_served_model(config, model))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()  # running explanations stop at their next checkpoint

    app = FastAPI(
        title="evidencemap",
        version=evidencemap.__version__,
        summary="Maps of evidence: why a convolutional network decided what it decided.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.executor, app.state.costly_executor = service.cheap_lane, service.costly_lane
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes + FORM_SLACK)
    app.add_middleware(Guard, allowed_origins=frozenset(config.allowed_origins))
    app.add_middleware(  # outermost: it sees the refusals of the two above as well
        RefusalThrottle, delay=config.refusal_delay, allowance=config.refusal_allowance
    )
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": message}``: refusals with their status, the framework's own
    (404, 405, a malformed form) likewise, anything else a 500 logged with its traceback."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=exc)
        return JSONResponse(
            {"error": f"internal server error ({type(exc).__name__}); see the server log"},
            status_code=500,
        )
