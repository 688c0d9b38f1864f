"""The web service and its page: ``create_app(model_name=...)`` → a FastAPI app.

Needs the ``serve`` extra (``pip install evidencemap[serve]``: fastapi, uvicorn,
python-multipart). Start it with ``evidencemap serve``; see ``docs/server.md``.
"""

from evidencemap.server.app import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    MAX_TOP_K,
    ApiError,
    create_app,
    method_options,
)
from evidencemap.server.config import ServiceConfig
from evidencemap.server.service import Service

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MAX_TOP_K",
    "ApiError",
    "Service",
    "ServiceConfig",
    "create_app",
    "method_options",
]
