"""Helpers of the web-service tests: photos as upload bytes, decoding answers, a live server."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image
from skimage import data


def photo_bytes(name: str = "chelsea", fmt: str = "PNG", **save: object) -> bytes:
    """A real photo from ``skimage.data`` encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def decode_array(item: dict) -> np.ndarray:
    """An ``ArrayData`` answer → the float32 array it holds."""
    assert item["dtype"] == "float32"
    assert item["byteorder"] == "little"
    values = np.frombuffer(base64.b64decode(item["data"]), dtype="<f4")
    return values.reshape(item["shape"])


def decode_png(url: str) -> Image.Image:
    """A ``data:image/png;base64,`` URL → the PIL image."""
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    assert image.format == "PNG"
    image.load()
    return image


@contextmanager
def live_server(app: object, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
