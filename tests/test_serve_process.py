"""``evidencemap serve`` as a real process: it stops promptly on SIGTERM, work included."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server_helpers import photo_bytes

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

SRC = Path(__file__).resolve().parents[1] / "src"
LONG_FGVIS = {"max_iterations": 500, "patience": 500, "converge_tol": 0.0}  # at the cap: ~1 min


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "evidencemap", "serve", "--port", str(port), *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not start: {process.communicate()[1].decode()[-2000:]}")


def test_sigterm_stops_a_busy_server_within_seconds():
    process, url = _start("--workers", "2", "--torch-threads", "1", "--log-level", "warning")
    photo = photo_bytes("chelsea", "PNG")
    answers: list[object] = []

    def post() -> None:
        try:
            response = httpx.post(
                url + "/api/explain",
                files={"file": ("c.png", photo, "image/png")},
                data={"method": "fgvis", "options": json.dumps(LONG_FGVIS)},
                timeout=120,
            )
            answers.append(response.status_code)
        except httpx.TransportError as err:  # the connection closed by the stopping server
            answers.append(type(err).__name__)

    clients = [threading.Thread(target=post, daemon=True) for _ in range(3)]  # 2 run, 1 queued
    try:
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).json()["busy"] < 3:
            assert time.monotonic() < deadline, "the FGVis requests did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # the two workers are inside FGVis' iterations
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the server still ran 10 s after SIGTERM")
        stopped = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read().decode() if process.stderr else ""
    # uvicorn ends the process by the signal it stopped on, after a graceful shutdown
    assert process.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert stopped < 10
    for client in clients:  # every client had its answer (503) or its connection closed
        client.join(timeout=5)
        assert not client.is_alive()
    assert len(answers) == 3
    assert answers == [503, 503, 503], answers  # stopped work answers before the process ends
    assert 200 not in answers  # no FGVis ran to its end after the signal
    assert "Traceback" not in log, log[-2000:]


def test_cheap_requests_never_queue_behind_costly_ones(lite0):
    """One cheap and one costly worker: Grad-CAM answers while FGVis computes."""
    from evidencemap.server import create_app
    from server_helpers import live_server

    app = create_app(model=lite0, workers=1, costly_workers=1)
    photo = photo_bytes("chelsea", "PNG")
    files = {"file": ("c.png", photo, "image/png")}
    costly: list[int] = []
    with live_server(app) as url:
        fgvis = threading.Thread(
            target=lambda: costly.append(
                httpx.post(
                    url + "/api/explain",
                    files=files,
                    data={"method": "fgvis", "options": json.dumps(LONG_FGVIS)},
                    timeout=120,
                ).status_code
            )
        )
        fgvis.start()
        try:
            deadline = time.monotonic() + 30
            while httpx.get(url + "/health", timeout=5).json()["busy"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            answer = httpx.post(
                url + "/api/explain", files=files, data={"method": "gradcam"}, timeout=60
            )
            assert answer.status_code == 200
            assert fgvis.is_alive()  # FGVis was still computing
            assert not costly
        finally:
            app.state.service.shutdown.set()  # stops FGVis at its next iteration
            fgvis.join(30)
    assert costly == [503]


def test_costly_runs_pause_while_cheap_ones_compute(lite0):
    from evidencemap import runtime
    from evidencemap.server import create_app
    from evidencemap.server.app import COSTLY_PAUSE

    service = create_app(model=lite0).state.service
    began = time.perf_counter()
    service._yield_to_cheap()  # nothing cheap computing: no wait
    assert time.perf_counter() - began < COSTLY_PAUSE / 2
    with service._cheap():
        began = time.perf_counter()
        with runtime.limits(pause=service._yield_to_cheap):
            runtime.checkpoint()  # waits, but at most COSTLY_PAUSE: the costly run advances
        assert COSTLY_PAUSE * 0.9 <= time.perf_counter() - began < COSTLY_PAUSE * 4
    with service._cheap():  # the end of the cheap request wakes the costly one at once
        waited: list[float] = []

        def costly() -> None:
            start = time.perf_counter()
            service._yield_to_cheap()
            waited.append(time.perf_counter() - start)

        worker = threading.Thread(target=costly)
        worker.start()
        time.sleep(0.05)
    worker.join(5)
    assert waited
    assert waited[0] < COSTLY_PAUSE * 0.9
