"""The expected cost of each method on the served model, shown before it runs.

A method's cost is counted in **model passes per explained class**, of one of three kinds
(:data:`~evidencemap.methods.passes.PASS_KINDS`): ``"layer"`` (one Grad-CAM call — a forward and
a backward from the explained layer only), ``"input"`` (one saliency call — a forward and a
full backward to the input) and ``"forward"`` (one forward without gradients).

Nothing here is specific to a method: each method class declares its own count — its
``pass_kind``, ``passes_per_call``, the ``cost="work"`` option declared with ``passes=True``
and whether that is an upper bound, the method it wraps (:mod:`evidencemap.methods.passes`) —
and this module reads the declarations through :func:`evidencemap.methods.describe`, so a
method registered by its user is estimated like a built-in one. The service times one pass of
each kind on the served model once (:class:`Calibration`) and multiplies:
``seconds ≈ passes × seconds per pass``. That is an estimate for an idle machine, per class
(``top_k`` classes cost ``k`` times as much); ``last_seconds``, the time the latest run of that
method on this service actually took per class, is the measurement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from evidencemap.capture import record_outputs
from evidencemap.layers import resolve_layers
from evidencemap.methods import build, describe
from evidencemap.methods.passes import PASS_KINDS, PASS_UNITS
from evidencemap.methods.registry import MethodSpec

__all__ = ["PASS_KINDS", "Calibration", "CostBook", "pass_count"]


def pass_count(name: str, channels: int | None = None) -> tuple[float | None, str]:
    """Passes per class of method ``name`` with its default options, and their kind, as the
    method declares them (:meth:`~evidencemap.methods.MethodSpec.pass_count`).

    Args:
        name: a method name.
        channels: channels of the explained layer on the served model, for a method that
            takes one pass per channel by default (Score-CAM; ``None``: unknown).

    Returns:
        ``(passes, kind)``; ``passes`` is ``None`` when it depends on something unknown
        (Score-CAM's channels).
    """
    passes, kind, _ = describe(name).pass_count(channels)
    return passes, kind


def _fastest(call: Callable[[], object], repeats: int = 2) -> float:
    """Seconds of the fastest of ``repeats`` calls (the first one also warms up)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return min(times)


class Calibration:
    """One pass of each kind timed on the served model (once, lazily, as the method
    :data:`~evidencemap.methods.passes.PASS_UNITS` names), and the channels of the layer that
    the ``"layer"`` kind's method explains by default."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model = model
        self.x = x
        self._lock = threading.Lock()
        self._result: tuple[dict[str, float], int | None] | None = None

    def measure(self) -> tuple[dict[str, float], int | None]:
        """``({kind: seconds per pass}, channels of the default layer)``, measured the first
        time on the input ``x`` (a preprocessed grey photo)."""
        with self._lock:
            if self._result is None:
                x = self.x

                def forward() -> None:
                    with torch.inference_mode():
                        self.model(x)

                units = {
                    kind: build(name, self.model) if name else None
                    for kind, name in PASS_UNITS.items()
                }
                seconds = {
                    kind: _fastest(forward if unit is None else partial(unit, x))
                    for kind, unit in units.items()
                }
                channels = None
                layer_unit = units["layer"]
                layer = layer_unit(x).layer if layer_unit is not None else None
                if isinstance(layer, str):
                    (module,) = resolve_layers(self.model, layer)
                    with torch.inference_mode(), record_outputs([module]) as outputs:
                        self.model(x)
                    output = outputs.get(module)
                    channels = int(output.shape[1]) if output is not None else None
                self._result = (seconds, channels)
            return self._result


@dataclass
class _Run:
    seconds_per_class: float
    work: Any


class CostBook:
    """What each method costs on this service: the estimate and the latest measured run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, _Run] = {}

    def record(
        self, name: str | MethodSpec, seconds: float, classes: int, options: dict[str, Any]
    ) -> None:
        """Note a finished run of ``name`` (a method name or description): ``seconds`` for
        ``classes`` classes."""
        spec = name if isinstance(name, MethodSpec) else describe(name)
        work = options.get(spec.passes.option) if spec.passes.option else None
        with self._lock:
            self._last[spec.name] = _Run(seconds / max(1, classes), work)

    def cost(
        self, name: str | MethodSpec, calibration: tuple[dict[str, float], int | None] | None
    ) -> dict[str, Any]:
        """The ``cost`` entry of ``GET /api/methods`` (:class:`~.schemas.MethodCost`) of a
        method name or description."""
        channels = calibration[1] if calibration is not None else None
        spec = name if isinstance(name, MethodSpec) else describe(name)
        passes, kind, at_most = spec.pass_count(channels)
        per_pass = calibration[0][kind] if calibration is not None else None
        with self._lock:
            last = self._last.get(spec.name)
        return {
            "passes": passes,
            "pass_kind": kind,
            "work_option": spec.passes.option or None,
            "at_most": at_most,
            "seconds": None if passes is None or per_pass is None else passes * per_pass,
            "seconds_per_pass": per_pass,
            "last_seconds": last.seconds_per_class if last is not None else None,
            "last_work": last.work if last is not None else None,
        }
