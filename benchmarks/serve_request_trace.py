"""Count what one ``POST /api/explain`` request computes twice: method descriptions and option checks.

Follows one request (through FastAPI's test client, every thread) with ``sys.setprofile`` /
``threading.setprofile`` and counts the calls of
:func:`evidencemap.methods.registry.describe`, :func:`evidencemap.methods.registry.check_options`
and :meth:`evidencemap.methods.options.Option.check`, per request, on a tiny conv → GAP → linear
model (the counts do not depend on the model)::

    python benchmarks/serve_request_trace.py            # Grad-CAM
    python benchmarks/serve_request_trace.py scorecam   # another method (or several: a,b)
    python benchmarks/serve_request_trace.py scorecam '{"top_k": 4}'   # with options
"""

from __future__ import annotations

import io
import sys
import threading
import warnings
from collections import Counter
from types import FrameType
from typing import Any

import torch
from PIL import Image
from torch import nn

from evidencemap.methods import options, registry
from evidencemap.server import create_app

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


WATCHED = {
    registry.describe.__code__: "describe",
    registry.check_options.__code__: "check_options",
    options.Option.check.__code__: "Option.check",
}


def trace_request(method: str = "gradcam", option_json: str | None = None) -> Counter[str]:
    """The watched calls of one request to a new service (its worker threads start inside the
    trace, so that the profile follows them)."""
    torch.manual_seed(0)
    client = TestClient(create_app(model=_Net().eval()))
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(photo, format="PNG")
    form: dict[str, Any] = {"method": method}
    if option_json is not None:
        form["options"] = option_json

    def post() -> None:
        files = {"file": ("p.png", photo.getvalue(), "image/png")}
        response = client.post("/api/explain", files=files, data=form)
        assert response.status_code == 200, response.text

    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            name = WATCHED.get(frame.f_code)
            if name is not None:
                counts[name] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        post()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return counts


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "gradcam"
    counted = trace_request(name, sys.argv[2] if len(sys.argv) > 2 else None)
    shown = ", ".join(f"{k} {counted[k]}" for k in WATCHED.values())
    print(f"one POST /api/explain of {name!r}: {shown}")
