"""The service's refusals: :class:`ApiError` (a status and a message) and their OpenAPI table."""

from __future__ import annotations

from typing import Any

from evidencemap.server.schemas import ErrorResponse

__all__ = ["ERRORS", "ApiError"]


class ApiError(Exception):
    """A request the service refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad request: missing/empty file, bad method, target, top_k or options.",
        403: "A cross-origin request (another site's page) was refused.",
        413: "The file or the image is too large, or the request needs more memory than the "
        "service's budget.",
        415: "The file is not a PNG, JPEG, TIFF, BMP or WebP image.",
        422: "A method option is unknown, has a bad value or is over the service's cap, a "
        "method does not apply to the served model, or the request needs more than the "
        "service's time limit.",
        409: "The request_id is already used by a request in flight.",
        503: "Too many requests waiting, or the service is shutting down.",
    }.items()
}
"""``responses=`` of the routes: each refusal's status, described, with its body's model."""
