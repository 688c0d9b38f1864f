"""How good is the service's expected cost? Estimate before the run vs the measured run.

For each method, with its default options, on the chelsea photo (top-1 class) and the served
EfficientNet-Lite0: the estimate ``GET /api/methods`` reports before anything ran (``passes ×``
one timed Grad-CAM pass), the seconds the method then took in ``POST /api/explain``, and their
ratio. One request at a time, in process (FastAPI's test client), torch's default threads.
Run it on an otherwise idle machine: the estimate is for one.

Run: ``python benchmarks/method_costs.py [--out benchmarks/results/method_costs.md]``
"""

from __future__ import annotations

import argparse
import io
import platform
import warnings
from pathlib import Path

import torch
from PIL import Image
from skimage import data

from evidencemap import models
from evidencemap.server import create_app

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

METHODS = [
    "gradcam",
    "hirescam",
    "guided_gradcam",
    "smoothgrad",
    "integrated_gradients",
    "fgvis",
    "scorecam",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    photo = buffer.getvalue()
    client = TestClient(create_app(model=models.load("efficientnet-lite0")))
    costs = {m["name"]: m["cost"] for m in client.get("/api/methods").json()}
    lines = [
        "# Expected cost vs measured time per method (EfficientNet-Lite0, chelsea, top-1)",
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
        "one timed pass: "
        + ", ".join(
            f"{kind} {costs[name]['seconds_per_pass']:.3f} s"
            for kind, name in (("layer", "gradcam"), ("input", "saliency"), ("forward", "scorecam"))
        ),
        "",
        "| method | passes (default options) | kind | estimate s | measured s | measured / estimate |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name in METHODS:
        response = client.post(
            "/api/explain",
            files={"file": ("chelsea.png", photo, "image/png")},
            data={"method": name},
        )
        response.raise_for_status()
        took = response.json()["explanations"][0]["seconds"]
        cost = costs[name]
        bound = "≤ " if cost["at_most"] else ""
        lines.append(
            f"| {name} | {bound}{cost['passes']:g} | {cost['pass_kind']} | {cost['seconds']:.2f} | "
            f"{took:.2f} | "
            f"{took / cost['seconds']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
