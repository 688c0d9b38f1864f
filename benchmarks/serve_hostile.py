"""Hostile load on the web service: cheap, costly and hostile requests at once, loopback only.

Starts ``evidencemap serve`` (default caps, 512 MiB budget, ``--workers 4 --torch-threads 1``) on
127.0.0.1, measures Grad-CAM's unloaded latency (sequential requests), then for ``--duration``
seconds runs 8 concurrent clients: 2 post FGVis with capped options back to back, 4 post hostile
requests (options over the caps, a cross-origin POST, huge batch sizes), 2 post Grad-CAM. Reports
the status codes per kind, Grad-CAM's latency under load relative to unloaded, and the server's
peak resident memory (``VmHWM``). Every loop is bounded by the duration and stops by itself.

Run: ``python benchmarks/serve_hostile.py [--duration 30] [--out benchmarks/results/serve_hostile.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server, stop_server

HOSTILE = [
    (
        {
            "method": "fgvis",
            "options": json.dumps(
                {"max_iterations": 100000000, "patience": 100000000, "converge_tol": 0}
            ),
        },
        {},
    ),
    ({"method": "scorecam", "options": json.dumps({"internal_batch_size": 100000})}, {}),
    ({"method": "smoothgrad", "options": json.dumps({"samples": 10000000})}, {}),
    (
        {"method": "integrated_gradients", "options": json.dumps({"internal_batch_size": 1000000})},
        {},
    ),
    ({"method": "gradcam"}, {"Origin": "http://evil.example"}),
]
FGVIS = {"method": "fgvis", "options": json.dumps({"max_iterations": 60, "patience": 60})}


def photo_png() -> bytes:
    """chelsea as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(url: str, photo: bytes, duration: float) -> dict[str, object]:
    files = {"file": ("c.png", photo, "image/png")}
    codes: dict[str, dict[str, int]] = {"gradcam": {}, "fgvis": {}, "hostile": {}}
    latency: dict[str, list[float]] = {"gradcam": [], "fgvis": [], "hostile": []}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for _ in range(2):  # warm-up
            await client.post("/api/explain", files=files, data={"method": "gradcam"})
        unloaded = []
        for _ in range(15):
            began = time.perf_counter()
            await client.post("/api/explain", files=files, data={"method": "gradcam"})
            unloaded.append(time.perf_counter() - began)
        stop = time.perf_counter() + duration

        async def worker(kind: str, index: int) -> None:
            i = index
            while time.perf_counter() < stop:
                if kind == "hostile":
                    form, headers = HOSTILE[i % len(HOSTILE)]
                    i += 1
                elif kind == "fgvis":
                    form, headers = FGVIS, {}
                else:
                    form, headers = {"method": "gradcam"}, {}
                began = time.perf_counter()
                response = await client.post(
                    "/api/explain", files=files, data=form, headers=headers
                )
                latency[kind].append(time.perf_counter() - began)
                key = str(response.status_code)
                codes[kind][key] = codes[kind].get(key, 0) + 1

        workers = [worker("fgvis", 0), worker("fgvis", 1)]
        workers += [worker("hostile", i) for i in range(4)]
        workers += [worker("gradcam", 0), worker("gradcam", 1)]
        await asyncio.gather(*workers)
    return {"unloaded": unloaded, "codes": codes, "latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    process, url = start_server(4, 1)
    try:
        result = asyncio.run(run(url, photo_png(), args.duration))
        peak = rss_peak_mb(process.pid)
    finally:
        stop_server(process)
    unloaded = np.array(result["unloaded"])
    loaded = np.array(result["latency"]["gradcam"])
    u50 = float(np.median(unloaded))
    lines = [
        "# Hostile load on the web service",
        "",
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} cores seen by "
        f"torch, `serve --workers 4 --torch-threads 1`, default caps and budget, "
        f"{args.duration:.0f} s of load, 8 clients (2 FGVis with max_iterations=60, 4 hostile, "
        "2 Grad-CAM). Loopback only.",
        "",
        "| requests | count | status codes |",
        "|---|---:|---|",
    ]
    for kind in ("gradcam", "fgvis", "hostile"):
        codes = result["codes"][kind]
        lines.append(
            f"| {kind} | {sum(codes.values())} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
            + " |"
        )
    fives = sum(v for c in result["codes"].values() for k, v in c.items() if k.startswith("5"))
    hostile = np.array(result["latency"]["hostile"])
    lines += [
        "",
        "| Grad-CAM latency | p50 s | p99 s | p99 / unloaded p50 |",
        "|---|---:|---:|---:|",
        f"| unloaded (15 sequential) | {u50:.3f} | {np.percentile(unloaded, 99):.3f} | "
        f"{np.percentile(unloaded, 99) / u50:.2f} |",
        f"| under load | {np.median(loaded):.3f} | {np.percentile(loaded, 99):.3f} | "
        f"{np.percentile(loaded, 99) / u50:.2f} |",
        "",
        f"5xx answers: {fives}. Hostile requests answered in p50 {np.median(hostile):.3f} s, "
        f"max {hostile.max():.3f} s. Server peak resident memory: {peak:.0f} MiB.",
        "",
        "On 2 cores the two FGVis runs and Grad-CAM share the CPU, so Grad-CAM's latency under "
        "load reflects CPU sharing; the hostile requests never reach a model.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
