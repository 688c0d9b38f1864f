"""``POST /api/explain``: explain the model's decision on an uploaded photo."""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from evidencemap.server.config import MAX_TOP_K
from evidencemap.server.errors import ERRORS, ApiError
from evidencemap.server.forms import ExplainRequest, read_explain_form
from evidencemap.server.progress import ProgressBoard, RequestProgress
from evidencemap.server.routes.deps import ServiceDep
from evidencemap.server.schemas import ExplainResponse

__all__ = ["router"]

router = APIRouter(tags=["explain"])

DISCONNECT_POLL = 0.25
"""Seconds between two looks at whether the client went away (which cancels its work)."""


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) == 0:
        raise ApiError(400, "the uploaded file is empty")
    if len(data) > limit:
        raise ApiError(413, f"the uploaded file exceeds the limit of {limit} bytes")
    return data


def abandon(future: asyncio.Future[Any]) -> None:
    """Let a worker's result go unanswered: its outcome (the 503 the worker raises at its next
    checkpoint once the service stops) is retrieved when it comes, so asyncio does not log it
    as "Future exception was never retrieved" with a traceback."""

    def retrieve(done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()

    future.add_done_callback(retrieve)


def _register(
    board: ProgressBoard, request: ExplainRequest, cancel: threading.Event
) -> RequestProgress | None:
    """Track the request on ``board`` when it has an id (409 when that id is in flight)."""
    if request.request_id is None:
        return None
    try:
        return board.register(request.request_id, [m.name for m in request.methods], cancel)
    except KeyError:
        raise ApiError(409, f"request_id {request.request_id!r} is already in use") from None


@router.post("/api/explain", response_model=ExplainResponse, responses=ERRORS)
async def explain(
    request: Request,
    service: ServiceDep,
    file: Annotated[
        UploadFile | None, File(description="The photo (PNG, JPEG, TIFF, BMP, WebP).")
    ] = None,
    method: Annotated[str, Form(description="Method name(s), comma-separated.")] = "gradcam",
    target: Annotated[
        str | None, Form(description="Class index to explain (default: top-1).")
    ] = None,
    top_k: Annotated[
        str | None, Form(description=f"Explain the top-k classes (1–{MAX_TOP_K}).")
    ] = None,
    options: Annotated[
        str | None,
        Form(
            description='Method options as a JSON object, e.g. {"top_k": 64}, or per '
            'method, e.g. {"scorecam": {"top_k": 64}}.'
        ),
    ] = None,
    request_id: Annotated[
        str | None,
        Form(
            description="An id of your choice (8–64 letters, digits, - or _) to follow the "
            "request at GET /api/progress/{request_id} and stop it with POST "
            "/api/cancel/{request_id}."
        ),
    ] = None,
) -> ExplainResponse:
    """Explain the model's decision on an uploaded photo with one or more methods."""
    if file is None:
        raise ApiError(400, "no image: send the photo as the multipart field 'file'")
    sent = (await request.form()).get("method")
    if isinstance(sent, str) and not sent.strip():  # an empty field, not a missing one
        raise ApiError(400, "method must name at least one method, e.g. 'gradcam'")
    form = read_explain_form(method, target, top_k, options, request_id, len(service.labels))
    prepared = service.prepare(form)  # refused here, without a worker, before decoding
    data = await _read_upload(file, service.config.max_upload_bytes)
    with service.admit():
        cancel = threading.Event()
        progress = _register(service.board, form, cancel)
        try:
            job = partial(service.explain, data, prepared, cancel)
            if progress is not None:
                job = partial(progress.run, job)
            future = asyncio.wrap_future(service.submit(job, prepared.costly))
            while True:  # a client that goes away cancels its work
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL)
                if done and not future.cancelled():
                    return future.result()
                if done or service.shutdown.is_set():
                    # The worker stops at its next checkpoint; the client is answered now, so
                    # the server's graceful shutdown never has to cut a running request off.
                    abandon(future)
                    raise ApiError(503, "the service is shutting down; retry later")
                if await request.is_disconnected():
                    cancel.set()
        finally:
            service.board.release(progress)
