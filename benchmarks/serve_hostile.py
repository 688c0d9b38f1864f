"""Hostile load on the web service: cheap, costly and hostile requests at once, loopback only.

Starts ``evidencemap serve`` (default caps, 512 MiB budget, ``--workers 2 --costly-workers 2
--torch-threads 1``) on 127.0.0.1, measures Grad-CAM's unloaded latency (sequential requests),
then runs 8 concurrent clients: 2 post capped FGVis requests back to back (these run in the
service's costly lane, which yields to cheap requests), 4 post hostile requests (options over the caps,
unknown options, a cross-origin POST), 2 post Grad-CAM. Once both FGVis requests compute, the
Grad-CAM clients post ``--gradcam`` requests in all; the other clients stop when they are done
(every loop has a bounded count). Reports the status codes per kind, Grad-CAM's latency under
load (the requests that ran while two FGVis requests computed) against the unloaded p50 and
p99, and the server's resident memory (idle and peak ``VmHWM``) against the memory budget.

Run: ``python benchmarks/serve_hostile.py [--gradcam 80] [--repeat 2]
[--out benchmarks/results/serve_hostile.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server, stop_server

WORKERS, COSTLY_WORKERS, THREADS = 2, 2, 1
BUDGET_MB = 512
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
    ({"method": "scorecam", "options": json.dumps({"top_kk": 8})}, {}),
    ({"method": "gradcam"}, {"Origin": "http://evil.example"}),
]
FGVIS = {"method": "fgvis", "options": json.dumps({"max_iterations": 60, "patience": 60})}
UNLOADED = 30
MAX_FGVIS, MAX_HOSTILE = 50, 2000  # per client: the bounds of the background loops
FGVIS_GRACE = 300.0  # seconds the open FGVis requests may take to finish after the load


def photo_png() -> bytes:
    """chelsea as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return buffer.getvalue()


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _count(codes: dict[str, int], status: int) -> None:
    codes[str(status)] = codes.get(str(status), 0) + 1


async def background(
    url: str, photo: bytes, n_fgvis: int, n_hostile: int, stop: Any
) -> dict[str, Any]:
    """The FGVis and hostile clients until ``stop`` is set (each loop has a bounded count); then
    the hostile clients stop at once and each FGVis client finishes the request it has open."""
    files = {"file": ("c.png", photo, "image/png")}
    codes: dict[str, dict[str, int]] = {"fgvis": {}, "hostile": {}}
    latency: dict[str, list[float]] = {"fgvis": [], "hostile": []}
    fgvis_spans: list[tuple[float, float]] = []  # (start, end) wall-clock of each FGVis request
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def fgvis() -> None:
            for _ in range(MAX_FGVIS):
                if stop.is_set():
                    return
                began = time.time()
                try:
                    response = await client.post("/api/explain", files=files, data=FGVIS)
                finally:
                    fgvis_spans.append((began, time.time()))
                latency["fgvis"].append(time.time() - began)
                _count(codes["fgvis"], response.status_code)

        async def hostile(index: int) -> None:
            for i in range(index, index + MAX_HOSTILE):
                if stop.is_set():
                    return
                form, headers = HOSTILE[i % len(HOSTILE)]
                began = time.perf_counter()
                response = await client.post(
                    "/api/explain", files=files, data=form, headers=headers
                )
                latency["hostile"].append(time.perf_counter() - began)
                _count(codes["hostile"], response.status_code)

        tasks = [asyncio.create_task(fgvis()) for _ in range(n_fgvis)]
        tasks += [asyncio.create_task(hostile(i)) for i in range(n_hostile)]
        while not stop.is_set() and not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
        for task in tasks[n_fgvis:]:  # a hostile request still open is dropped
            task.cancel()
        # the open FGVis requests finish (the service's time limit bounds them)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), FGVIS_GRACE)
    return {"codes": codes, "latency": latency, "fgvis_spans": fgvis_spans}


def background_process(
    url: str, photo: bytes, n_fgvis: int, n_hostile: int, stop: Any, out: Any
) -> None:
    """Entry of the load-generating process (so the clients measured share no event loop)."""
    out.put(asyncio.run(background(url, photo, n_fgvis, n_hostile, stop)))


async def measured(
    url: str, photo: bytes, n_gradcam: int, n_fgvis: int, pid: int, start: Any
) -> dict[str, Any]:
    """Unloaded Grad-CAM latency, then ``start()`` the load and post ``n_gradcam`` requests
    from 2 clients once ``n_fgvis`` requests compute."""
    files = {"file": ("c.png", photo, "image/png")}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for _ in range(3):  # warm-up
            await client.post("/api/explain", files=files, data={"method": "gradcam"})
        unloaded = []
        for _ in range(UNLOADED):
            began = time.perf_counter()
            await client.post("/api/explain", files=files, data={"method": "gradcam"})
            unloaded.append(time.perf_counter() - began)
        idle_rss = memory_mb(pid, "VmRSS")
        start()
        while int((await client.get("/health")).json()["busy"]) < n_fgvis:
            await asyncio.sleep(0.05)
        codes: dict[str, int] = {}
        spans: list[tuple[float, float]] = []
        remaining = [n_gradcam]

        async def gradcam() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                began = time.time()
                response = await client.post(
                    "/api/explain", files=files, data={"method": "gradcam"}
                )
                spans.append((began, time.time()))
                _count(codes, response.status_code)

        began = time.perf_counter()
        await asyncio.gather(gradcam(), gradcam())
        wall = time.perf_counter() - began
    return {
        "unloaded": unloaded,
        "idle_rss": idle_rss,
        "codes": codes,
        "spans": spans,
        "wall": wall,
    }


CONFIGS = {
    "defaults": (),
    "costly lane not niced": ("--costly-niceness", "0"),
    "no refusal throttle": ("--refusal-delay", "0"),
}
"""Server configurations: the defaults, and each of two defences switched off (``--ablation``)."""


def one_run(
    n_gradcam: int, n_fgvis: int = 2, n_hostile: int = 4, server_args: tuple[str, ...] = ()
) -> dict[str, Any]:
    process, url = start_server(
        WORKERS, THREADS, "--costly-workers", str(COSTLY_WORKERS), "--memory-budget-mb",
        str(BUDGET_MB), *server_args,
    )  # fmt: skip
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    photo = photo_png()
    load = context.Process(
        target=background_process, args=(url, photo, n_fgvis, n_hostile, stop, out)
    )
    try:
        front = asyncio.run(measured(url, photo, n_gradcam, n_fgvis, process.pid, load.start))
        stop.set()
        back = out.get(timeout=FGVIS_GRACE + 60)
        load.join(60)
        peak = memory_mb(process.pid, "VmHWM")
    finally:
        stop.set()
        if load.is_alive():
            load.terminate()
        stop_server(process)
    # the Grad-CAM requests that started and ended while n_fgvis FGVis requests were in flight
    during = [
        end - begin
        for begin, end in front["spans"]
        if sum(b <= begin and end <= e for b, e in back["fgvis_spans"]) >= n_fgvis
    ]
    latency = {**back["latency"], "gradcam": [e - b for b, e in front["spans"]]}
    return {
        "unloaded": front["unloaded"],
        "codes": {"gradcam": front["codes"], **back["codes"]},
        "latency": latency,
        "during": during,
        "idle_rss": front["idle_rss"],
        "peak_rss": peak,
        "wall": front["wall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradcam", type=int, default=80, help="Grad-CAM requests under load")
    parser.add_argument("--repeat", type=int, default=2, help="runs, each with a fresh server")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also run once with each defence off (costly lane not niced; no refusal throttle)",
    )
    parser.add_argument("--fgvis-clients", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--hostile-clients", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    plan = [("defaults", CONFIGS["defaults"])] * args.repeat
    if args.ablation:
        plan += [(name, extra) for name, extra in CONFIGS.items() if name != "defaults"]
    loads = [os.getloadavg()[0]]
    runs = []
    for name, extra in plan:
        result = one_run(args.gradcam, args.fgvis_clients, args.hostile_clients, extra)
        runs.append({**result, "config": name, "args": " ".join(extra)})
        loads.append(os.getloadavg()[0])
    command = f"python benchmarks/serve_hostile.py --gradcam {args.gradcam} --repeat {args.repeat}"
    command += " --ablation" if args.ablation else ""
    lines = [
        "# Hostile load on the web service",
        "",
        f"`{command}` — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. Server: `serve --workers {WORKERS} --costly-workers "
        f"{COSTLY_WORKERS} --torch-threads {THREADS} --memory-budget-mb {BUDGET_MB}`, default "
        "caps (runs of the ablation add the flag in the *config* column). 8 clients over "
        "loopback: 2 post FGVis (max_iterations=60, the costly lane), 4 post hostile requests "
        "(options over the caps, an unknown option, a cross-origin POST), 2 post Grad-CAM "
        f"({args.gradcam} requests in all, started once both FGVis requests compute); once they "
        "are answered the hostile clients stop and each FGVis client waits for the request it "
        "has open. Each run has a fresh server; the load generator runs on the same cores. "
        "System load average (1 min) at the start and after each run: "
        f"{', '.join(f'{v:.1f}' for v in loads)} (other processes share the machine's cores, so "
        "the numbers are noisy).",
        "",
        "| run | config | kind | count | status codes |",
        "|---:|---|---|---:|---|",
    ]

    def config(result: dict[str, Any]) -> str:
        return result["config"] + (f" (`{result['args']}`)" if result["args"] else "")

    for r, result in enumerate(runs, 1):
        for kind in ("gradcam", "fgvis", "hostile"):
            codes = result["codes"][kind]
            lines.append(
                f"| {r} | {config(result)} | {kind} | {sum(codes.values())} | "
                + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
                + " |"
            )
    lines += [
        "",
        "Grad-CAM latency (s). *Unloaded*: "
        f"{UNLOADED} sequential requests before the load. *Loaded*: the requests that started and "
        "ended while both FGVis requests computed (n), measured at the client.",
        "",
        "| run | config | unloaded p50 | unloaded p99 | n | loaded p50 | loaded p99 | "
        "loaded p99 / unloaded p99 | loaded p99 / unloaded p50 | 5xx |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, result in enumerate(runs, 1):
        u = np.array(result["unloaded"])
        d = np.array(result["during"]) if result["during"] else np.array([float("nan")])
        u50, u99 = float(np.median(u)), float(np.percentile(u, 99))
        l50, l99 = float(np.median(d)), float(np.percentile(d, 99))
        fives = sum(v for c in result["codes"].values() for k, v in c.items() if k.startswith("5"))
        lines.append(
            f"| {r} | {config(result)} | {u50:.3f} | {u99:.3f} | {len(result['during'])} | "
            f"{l50:.3f} | {l99:.3f} | {l99 / u99:.2f} | {l99 / u50:.2f} | {fives} |"
        )
    lines += [
        "",
        "All loaded Grad-CAM requests (also those that overlapped fewer FGVis requests): "
        + "; ".join(
            f"run {r}: n {len(res['latency']['gradcam'])}, p50 "
            f"{np.median(res['latency']['gradcam']):.3f} s, p99 "
            f"{np.percentile(res['latency']['gradcam'], 99):.3f} s"
            for r, res in enumerate(runs, 1)
        )
        + ".",
        "",
        "| run | config | idle RSS MiB | peak RSS MiB | peak − idle MiB | memory budget MiB | "
        "FGVis answered, p50 s | hostile p50 / max s | Grad-CAM phase s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, result in enumerate(runs, 1):
        hostile = np.array(result["latency"]["hostile"] or [float("nan")])
        fg = np.array(result["latency"]["fgvis"] or [float("nan")])
        growth = result["peak_rss"] - result["idle_rss"]
        lines.append(
            f"| {r} | {config(result)} | {result['idle_rss']:.0f} | {result['peak_rss']:.0f} | "
            f"{growth:.0f} | {BUDGET_MB} | {len(result['latency']['fgvis'])}, "
            f"{np.median(fg):.1f} | {np.median(hostile):.3f} / {hostile.max():.3f} | "
            f"{result['wall']:.0f} |"
        )
    lines += [
        "",
        "Idle RSS: after start-up and the unloaded requests (the model, torch, the app). The "
        "budget bounds one chunk of one request's computation; the peak "
        + (
            "stayed within idle + budget in every run"
            if all(r["peak_rss"] <= r["idle_rss"] + BUDGET_MB for r in runs)
            else "went over idle + budget in a run"
        )
        + ", with four explanations computing at once. Hostile requests are refused "
        "before the upload is decoded and without a worker, so they never reach a model; once "
        "the client address has had 20 refusals in 10 s, each further refusal waits 0.5 s "
        "(`--refusal-delay`), so the hostile clients slow themselves down. FGVis runs in the "
        "costly lane, whose threads are niced (`--costly-niceness 19`) and pause at each "
        "iteration (at most 0.25 s) while a cheap request computes: the operating system gives "
        "Grad-CAM the cores first, and FGVis computes on the time left over (it takes longer "
        "under load).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
