"""Progress and cancellation of the service's requests, by a request id the client chooses.

The page sends a random ``request_id`` with ``POST /api/explain``; while the request computes,
``GET /api/progress/{request_id}`` reports its state (fed by the runtime's progress callback,
:func:`evidencemap.runtime.checkpoint`) and ``POST /api/cancel/{request_id}`` stops it at the
method's next checkpoint. A :class:`ProgressBoard` holds the requests in flight and the latest
finished ones (bounded), so that neither endpoint grows memory without limit.

The ids are chosen by the client: the client can poll and cancel before the upload has even
reached the service (a cancel that arrives first is remembered and applied when the request
registers). An id is 8 to 64 letters, digits, ``-`` or ``_``; a random one (the page uses
128 random bits) cannot be guessed by another client.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from evidencemap import runtime

__all__ = [
    "METHODS_STEP",
    "REQUEST_ID_PATTERN",
    "ProgressBoard",
    "RequestProgress",
    "check_request_id",
]

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
"""What a ``request_id`` may be: 8 to 64 letters, digits, ``-`` or ``_``."""
METHODS_STEP = "methods"
"""``desc`` of the service's own checkpoint before each method: ``done`` methods of ``total``."""
KEEP_FINISHED = 64
"""Finished requests whose last state stays readable."""
KEEP_SECONDS = 300.0
"""…for at most this long."""

T = TypeVar("T")


def check_request_id(value: str, name: str = "request_id") -> str:
    """``value`` if it is a valid request id.

    Raises:
        ValueError: naming ``name`` and the allowed form.
    """
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        raise ValueError(f"{name} must be 8 to 64 letters, digits, '-' or '_', got {shown!r}")
    return value


@dataclass
class RequestProgress:
    """The state of one request: its methods, the running one and its step.

    Attributes:
        request_id: the client's id.
        methods: the method names of the request, in order.
        cancel: set to stop the request at its next checkpoint.
        state: ``"queued"`` (waiting for a worker), ``"running"``, ``"done"``, ``"failed"``
            or ``"cancelled"`` (:meth:`snapshot` reports a queued or running request whose
            ``cancel`` is set as ``"cancelling"``).
    """

    request_id: str
    methods: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    method_index: int = 0
    step: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self, done: int, total: int, desc: str) -> None:
        """The runtime's progress callback (:data:`evidencemap.runtime.Progress`)."""
        with self.lock:
            if desc == METHODS_STEP:
                self.method_index = max(0, min(done, len(self.methods)))
                self.step = None
            else:
                self.step = {"desc": desc, "done": int(done), "total": int(total)}

    def run(self, job: Callable[[], T]) -> T:
        """Call ``job`` (in the worker thread) with :meth:`report` as its progress callback."""
        with self.lock:
            self.state = "running"
        outcome = "failed"
        try:
            with runtime.limits(progress=self.report):
                result = job()
            outcome = "done"
            return result
        finally:
            with self.lock:
                cancelled = outcome != "done" and self.cancel.is_set()
                self.state = "cancelled" if cancelled else outcome
                self.finished = time.monotonic()
                if outcome == "done":
                    self.method_index = len(self.methods)
                    self.step = None

    def snapshot(self) -> dict[str, Any]:
        """The state as ``GET /api/progress`` reports it (:class:`~.schemas.ProgressInfo`)."""
        with self.lock:
            end = self.finished if self.finished is not None else time.monotonic()
            n = len(self.methods)
            index = min(self.method_index, n)
            step = dict(self.step) if self.step is not None else None
            fraction = index / n if n else 0.0
            if step is not None and step["total"] > 0 and index < n:
                fraction += min(1.0, step["done"] / step["total"]) / n
            if self.state == "done":
                fraction = 1.0
            state = self.state
            if state in ("queued", "running") and self.cancel.is_set():
                state = "cancelling"
            return {
                "request_id": self.request_id,
                "state": state,
                "elapsed": end - self.started,
                "methods": list(self.methods),
                "method_index": index,
                "method": self.methods[index] if index < n and self.state == "running" else None,
                "step": step,
                "fraction": min(1.0, fraction),
            }


class ProgressBoard:
    """The requests in flight and the latest finished ones, by request id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, RequestProgress] = {}
        self._finished: OrderedDict[str, RequestProgress] = OrderedDict()
        self._early_cancels: OrderedDict[str, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        for store in (self._finished, self._early_cancels):
            while len(store) > KEEP_FINISHED:
                store.popitem(last=False)
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if oldest.finished is not None and now - oldest.finished <= KEEP_SECONDS:
                break
            self._finished.popitem(last=False)
        while self._early_cancels and now - next(iter(self._early_cancels.values())) > KEEP_SECONDS:
            self._early_cancels.popitem(last=False)

    def register(
        self, request_id: str, methods: list[str], cancel: threading.Event
    ) -> RequestProgress:
        """Start tracking a request (a cancel that came first sets ``cancel`` now).

        Raises:
            KeyError: when a request with that id is already in flight.
        """
        progress = RequestProgress(request_id, methods, cancel)
        with self._lock:
            if request_id in self._running:
                raise KeyError(request_id)
            self._finished.pop(request_id, None)
            if self._early_cancels.pop(request_id, None) is not None:
                cancel.set()
            self._running[request_id] = progress
        return progress

    def release(self, progress: RequestProgress | None) -> None:
        """The request is answered: keep its last state readable a while."""
        if progress is None:
            return
        with self._lock:
            self._running.pop(progress.request_id, None)
            with progress.lock:
                if progress.finished is None:  # it never reached a worker
                    progress.finished = time.monotonic()
                    progress.state = "cancelled" if progress.cancel.is_set() else "failed"
            self._finished[progress.request_id] = progress
            self._expire(time.monotonic())

    def get(self, request_id: str) -> dict[str, Any]:
        """The state of a request; ``state`` ``"unknown"`` for an id not (yet) seen."""
        with self._lock:
            self._expire(time.monotonic())
            progress = self._running.get(request_id) or self._finished.get(request_id)
            early = request_id in self._early_cancels
        if progress is not None:
            return progress.snapshot()
        return _empty(request_id, "cancelled" if early else "unknown")

    def cancel(self, request_id: str) -> dict[str, Any]:
        """Stop a request at its next checkpoint; an id not seen yet is cancelled on arrival."""
        with self._lock:
            progress = self._running.get(request_id)
            if progress is None:
                finished = self._finished.get(request_id)
                if finished is not None:
                    return finished.snapshot()
                self._early_cancels[request_id] = time.monotonic()
                self._expire(time.monotonic())
                return _empty(request_id, "cancelled")
            progress.cancel.set()
        return progress.snapshot()


def _empty(request_id: str, state: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "state": state,
        "elapsed": 0.0,
        "methods": [],
        "method_index": 0,
        "method": None,
        "step": None,
        "fraction": 0.0,
    }
