"""What every route may ask for: the app's :class:`~evidencemap.server.service.Service`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from evidencemap.server.service import Service

__all__ = ["ServiceDep", "get_service"]


def get_service(request: Request) -> Service:
    """The service of the app that received ``request`` (``app.state.service``)."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
"""A route parameter ``service: ServiceDep`` receives the app's service."""
