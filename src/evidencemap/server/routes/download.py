"""``POST /api/download/npz``: one map of an answer as a NumPy ``.npz`` file (the page's
download), in the library's one maps schema (:data:`evidencemap.io.MAPS_SCHEMA`, read back
with :func:`evidencemap.io.load_maps`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from evidencemap.io import maps_npz_bytes
from evidencemap.server.errors import ERRORS, ApiError
from evidencemap.server.render import decode_array
from evidencemap.server.schemas import NpzRequest

__all__ = ["router"]

router = APIRouter(tags=["explain"])


@router.post(
    "/api/download/npz",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 400: ERRORS[400]},
)
async def download_npz(body: NpzRequest) -> Response:
    """One ``ExplanationResult`` (as sent back by ``POST /api/explain``) as an ``.npz`` file of
    :data:`evidencemap.io.MAPS_SCHEMA`: ``maps`` ``(1, 1, H, W)``, ``raw`` (``raw_0``, … for
    several layers) ``(1, 1, h, w)``, ``scores``, ``targets``, ``method``, ``label``,
    ``layers``, ``options``."""
    try:
        arrays = decode_array(body.map), [decode_array(r) for r in body.raw]
    except ValueError as err:
        raise ApiError(400, f"not an array of the answer: {err}") from None
    if not arrays[1]:
        raise ApiError(400, "raw must hold at least one array")
    raws = [r.reshape(1, 1, *r.shape) for r in arrays[1]]
    layers = (
        [] if body.layer is None else [body.layer] if isinstance(body.layer, str) else body.layer
    )
    content = maps_npz_bytes(
        arrays[0].reshape(1, 1, *arrays[0].shape),
        raws[0] if len(raws) == 1 else raws,
        scores=None if body.score is None else [body.score],
        targets=[body.target],
        method=body.method,
        label=body.method,
        layers=layers,
        options=body.options,
    )
    return Response(content, media_type="application/octet-stream")
