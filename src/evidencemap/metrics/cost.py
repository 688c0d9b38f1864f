"""Cost of a method: seconds per image and peak memory of one call.

What is measured, exactly:

* time: wall-clock seconds of the call (``time.perf_counter``; on CUDA the device is
  synchronised before and after), divided by the number of images;
* memory on CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory
  allocated when it started (tensors the caching allocator handed out, not what it reserved);
* memory on CPU: the peak of the bytes the C allocator has handed out and not yet freed
  (glibc's ``mallinfo2``: ``uordblks + hblkhd``, which covers torch's CPU tensors), sampled
  every millisecond by a thread, minus the level when the call started. Unlike the resident
  set size it counts memory that the allocator reuses from earlier calls. Allocations that
  live under a millisecond can be missed, and other threads count too. Without glibc the
  peak resident set size (``/proc/self/statm``) is sampled the same way instead (kind
  ``"cpu_rss_sampled"``: memory reused from earlier calls is not seen); where neither exists
  the memory is reported as ``None``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from evidencemap.checks import check_positive_int
from evidencemap.methods.options import Option
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import Metric

__all__ = ["Cost", "CostResult", "PeakMemory"]

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [  # the ctypes layout of glibc's struct mallinfo2
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _load_mallinfo2()


def _allocated() -> int | None:
    """Bytes handed out by the C allocator and not freed (``None`` without glibc 2.33+)."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class PeakMemory:
    """Context manager measuring the peak memory above the level at entry (module docstring).

    After the block, ``peak_bytes`` holds the measurement (``None`` if unavailable) and
    ``kind`` says what was measured: ``"cuda_allocated"``, ``"cpu_malloc_sampled"``,
    ``"cpu_rss_sampled"`` or ``"none"``.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 1e-3) -> None:
        self.device = torch.device(device)
        self.interval = float(interval)
        self.peak_bytes: int | None = None
        self.kind = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._max = 0
        self._read: Callable[[], int | None] = _rss

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_allocated"
            return self
        self._read = _allocated if _MALLINFO2 is not None else _rss
        start = self._read()
        if start is None:
            return self
        self._start = self._max = start
        self.kind = "cpu_malloc_sampled" if _MALLINFO2 is not None else "cpu_rss_sampled"
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None and value > self._max:
                self._max = value
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            value = self._read()
            if value is not None:
                self._max = max(self._max, value)
            self.peak_bytes = max(0, self._max - self._start)


@dataclass
class CostResult:
    """Cost of one call.

    Attributes:
        seconds_per_image: wall-clock seconds divided by the number of images.
        peak_bytes: peak memory above the start level, or ``None`` when not measurable.
        memory_kind: what ``peak_bytes`` measures (see :class:`PeakMemory`).
    """

    seconds_per_image: float
    peak_bytes: int | None
    memory_kind: str


@register_metric
class Cost(Metric):
    """Time and peak memory of a call; lower is better for both.

    Args:
        device: where the call runs (``"cuda"``: the CUDA allocator's peak above the start; else the peak of the bytes the C allocator handed out, see :class:`PeakMemory`).
        warmup: calls made first and not measured (kernel selection, caches, lazy layers).
    """

    name = "cost"
    higher_is_better = False
    directions: ClassVar[dict[str, bool]] = {"seconds_per_image": False, "peak_memory_mb": False}
    titles: ClassVar[dict[str, str]] = {
        "seconds_per_image": "s / image",
        "peak_memory_mb": "Peak MB",
    }
    needs: ClassVar[frozenset[str]] = frozenset()
    OPTIONS = (Option("warmup", "int", 0, "calls made first and not measured", low=0),)

    def __init__(self, device: torch.device | str = "cpu", *, warmup: int = 0) -> None:
        self.device = torch.device(device)
        self.warmup = self.option("warmup", warmup)

    @classmethod
    def for_evaluation(
        cls, model: nn.Module, options: dict[str, Any], run: dict[str, Any]
    ) -> Metric:
        """A Cost on the run's device (the evaluation measures every method call with it)."""
        return cls(run["device"], **options)

    def score(self, context: MetricContext) -> MetricRecord:
        """Seconds and peak MB of the call that made the image's map (the evaluation times
        every such call)."""
        peak = context.peak_bytes
        return MetricRecord(
            {
                "seconds_per_image": context.seconds,
                "peak_memory_mb": None if peak is None else peak / 2**20,
            }
        )

    def __call__(self, call: Callable[[], Any], images: int = 1) -> tuple[Any, CostResult]:
        """Run ``call()`` and measure it; returns ``(its result, cost)``.

        Raises:
            TypeError: when ``call`` is not callable. ValueError: for ``images < 1``.
        """
        if not callable(call):
            raise TypeError(
                f"call must be a callable taking no arguments, got {type(call).__name__}"
            )
        images = check_positive_int(images, "images")
        for _ in range(self.warmup):
            call()
        cuda = self.device.type == "cuda"
        with PeakMemory(self.device) as memory:
            if cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            result = call()
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
        return result, CostResult(seconds / images, memory.peak_bytes, memory.kind)
