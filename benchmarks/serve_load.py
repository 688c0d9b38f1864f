"""Load test of the web service: throughput and latency of Grad-CAM requests on a real photo.

Starts ``evidencemap serve`` on 127.0.0.1 in its own process for each configuration, runs N
concurrent httpx clients for a fixed time, each posting chelsea (PNG) to ``/api/explain`` with
``method=gradcam`` back to back, then stops the server. Reports requests/s, latency percentiles,
errors, and the latency relative to a bare forward+backward pass of the model measured in this
process (2 torch threads) just before. Loopback only.

Run: ``python benchmarks/serve_load.py [--duration 20] [--out benchmarks/results/serve_load.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from skimage import data

from evidencemap import models

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
# (concurrent clients, server --workers, server --torch-threads)
CONFIGS = [(1, 1, 2), (1, 2, 1), (2, 2, 1), (4, 2, 1), (8, 2, 1), (4, 1, 2)]
SERVE = (
    "import argparse, sys\n"
    "from evidencemap.cli import serve\n"
    "parser = argparse.ArgumentParser()\n"
    "serve.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(workers: int, threads: int, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``evidencemap serve`` on a free loopback port (``extra``: more of its arguments)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", SERVE, "serve", "--host", HOST, "--port", str(port)]
    command += ["--workers", str(workers), "--torch-threads", str(threads), *extra]
    command += ["--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def load(url: str, photo: bytes, clients: int, duration: float) -> dict[str, object]:
    latencies: list[float] = []
    sizes: list[int] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        # one warm-up request (first call finds the layer, allocates)
        await client.post("/api/explain", files={"file": ("c.png", photo, "image/png")})
        stop = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                began = time.perf_counter()
                try:
                    response = await client.post(
                        "/api/explain",
                        files={"file": ("chelsea.png", photo, "image/png")},
                        data={"method": "gradcam"},
                    )
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                if response.status_code != 200:
                    key = str(response.status_code)
                    errors[key] = errors.get(key, 0) + 1
                    continue
                latencies.append(time.perf_counter() - began)
                sizes.append(len(response.content))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "sizes": sizes, "errors": errors, "elapsed": elapsed}


def bare_pass_seconds() -> tuple[float, float]:
    """Min times of one inference forward and of one forward+backward (gradient to the input)
    of the model on one 224² image, in this process with 2 torch threads."""
    model = models.load("efficientnet-lite0")
    x = model.preprocess(data.chelsea()).unsqueeze(0)
    forward, backward = [], []
    for _ in range(10):
        began = time.perf_counter()
        with torch.inference_mode():
            model(x)
        forward.append(time.perf_counter() - began)
        xi = x.clone().requires_grad_(True)
        began = time.perf_counter()
        torch.autograd.grad(model(xi)[0].max(), xi)
        backward.append(time.perf_counter() - began)
    return min(forward[2:]), min(backward[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    photo = buffer.getvalue()
    bare, bare_backward = bare_pass_seconds()
    load_before = os.getloadavg()[0]

    lines = [
        "# Web service load: Grad-CAM on chelsea (451×300 PNG) over loopback",
        "",
        f"`python benchmarks/serve_load.py --duration {args.duration:g}` — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}.",
        f"Bare passes of the model on one 224² image in this process (2 threads, min of 8): "
        f"inference forward {bare * 1000:.1f} ms, forward+backward to the input "
        f"{bare_backward * 1000:.1f} ms. Each request = upload, decode, preprocess, predict (forward), "
        "Grad-CAM (forward + backward from the layer), 3 PNG encodes, JSON (~{size} kB).",
        "",
        "| clients | workers | torch threads | requests | req/s | p50 ms | p90 ms | p99 ms "
        "| p50 / bare forward | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    size_kb = 0.0
    for clients, workers, threads in CONFIGS:
        process, url = start_server(workers, threads)
        try:
            result = asyncio.run(load(url, photo, clients, args.duration))
        finally:
            stop_server(process)
        lat = np.array(result["latencies"]) * 1000
        if len(result["sizes"]):
            size_kb = float(np.mean(result["sizes"])) / 1024
        p50, p90, p99 = (np.percentile(lat, q) if len(lat) else float("nan") for q in (50, 90, 99))
        errors = ", ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "0"
        lines.append(
            f"| {clients} | {workers} | {threads} | {len(lat)} | {len(lat) / result['elapsed']:.2f} "
            f"| {p50:.0f} | {p90:.0f} | {p99:.0f} | {p50 / (bare * 1000):.1f}× | {errors} |"
        )
        print(lines[-1], flush=True)
    lines[3] = lines[3].replace("{size}", f"{size_kb:.0f}")
    lines += [
        "",
        "workers = explanation threads in the one server process (one shared model); torch "
        "threads = `--torch-threads` (default cores ÷ workers). Latency is measured at the "
        "client, so with more clients than workers it includes the time queued.",
        f"System load average (1 min) before / after: {load_before:.1f} / "
        f"{os.getloadavg()[0]:.1f} (other processes on the machine share its cores).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
