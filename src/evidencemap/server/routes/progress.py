"""``GET /api/progress/{request_id}`` and ``POST /api/cancel/{request_id}``
(:mod:`evidencemap.server.progress`)."""

from __future__ import annotations

from fastapi import APIRouter

from evidencemap.server.errors import ERRORS
from evidencemap.server.forms import parse_request_id
from evidencemap.server.routes.deps import ServiceDep
from evidencemap.server.schemas import ProgressInfo

__all__ = ["router"]

router = APIRouter(tags=["explain"])


@router.get("/api/progress/{request_id}", response_model=ProgressInfo, responses={400: ERRORS[400]})
async def request_progress(request_id: str, service: ServiceDep) -> ProgressInfo:
    """The state of the explanation request sent with this ``request_id``: queued,
    running (which method, which step), cancelling, done, failed or cancelled; ``"unknown"``
    before it arrives and a while after it finished."""
    return ProgressInfo(**service.board.get(parse_request_id(request_id)))


@router.post(
    "/api/cancel/{request_id}",
    response_model=ProgressInfo,
    responses={400: ERRORS[400], 403: ERRORS[403]},
)
async def cancel_request(request_id: str, service: ServiceDep) -> ProgressInfo:
    """Stop the explanation request sent with this ``request_id`` at its method's next
    step (the request itself is then answered 499); an id that has not arrived yet is
    cancelled when it does."""
    return ProgressInfo(**service.board.cancel(parse_request_id(request_id)))
