"""``POST /api/download/npz``: one map of an answer as a NumPy ``.npz`` file (the page's
download; the file's layout is :func:`evidencemap.server.render.npz_bytes`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from evidencemap.server.errors import ERRORS, ApiError
from evidencemap.server.render import decode_array, npz_bytes
from evidencemap.server.schemas import NpzRequest

__all__ = ["router"]

router = APIRouter(tags=["explain"])


@router.post(
    "/api/download/npz",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 400: ERRORS[400]},
)
async def download_npz(body: NpzRequest) -> Response:
    """The ``map``, ``raw`` and ``target`` of one ``ExplanationResult`` (as sent back by
    ``POST /api/explain``) as an ``.npz`` file."""
    try:
        arrays = decode_array(body.map), [decode_array(r) for r in body.raw]
    except ValueError as err:
        raise ApiError(400, f"not an array of the answer: {err}") from None
    if not arrays[1]:
        raise ApiError(400, "raw must hold at least one array")
    content = npz_bytes(arrays[0], arrays[1], body.target)
    return Response(content, media_type="application/octet-stream")
