"""The service's routes: one ``APIRouter`` per file, included by :func:`~evidencemap.server.create_app`.

* :mod:`.page` — ``/`` (the page), its assets and ``/health``;
* :mod:`.catalog` — ``GET /api/methods``, ``/api/models``, ``/api/labels``;
* :mod:`.explain` — ``POST /api/explain``;
* :mod:`.progress` — ``GET /api/progress/{id}``, ``POST /api/cancel/{id}``;
* :mod:`.download` — ``POST /api/download/npz``.

A route takes the app's :class:`~evidencemap.server.service.Service` as a parameter
``service: ServiceDep`` (:mod:`.deps`) and refuses with
:class:`~evidencemap.server.errors.ApiError`; a new route is a new file here, added to
:data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from evidencemap.server.routes import catalog, download, explain, page, progress

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    page.router,
    catalog.router,
    explain.router,
    progress.router,
    download.router,
)
"""Every router of the service, in the order the app includes them."""
