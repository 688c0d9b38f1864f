"""The expected cost of each method on the served model, shown before it runs.

A method's cost is counted in **model passes per explained class**: one pass is one forward
(and, for gradient methods, one backward) of the model on one image. Grad-CAM and its family
take about one; the others take as many as their work option says (FGVis ``max_iterations``,
at most — it stops earlier when the score plateaus; Integrated Gradients ``steps``; SmoothGrad
``samples`` times the wrapped method; Score-CAM one masked forward per channel of its layer, or
``top_k``, at most — constant channels cost none). The service times one Grad-CAM pass on the served model once
(:class:`Calibration`) and multiplies: ``seconds ≈ passes × seconds per pass``. That is an
estimate on an idle machine, per class (``top_k`` classes cost ``k`` times as much), and it
ignores a method's own overheads; ``last_seconds``, the time the latest run of that method on
this service actually took per class, is the measurement.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evidencemap.capture import record_outputs
from evidencemap.layers import resolve_layers
from evidencemap.methods import build, describe
from evidencemap.methods.base import Method

__all__ = ["UPPER_BOUNDS", "WORK_OPTIONS", "Calibration", "CostBook", "passes_per_class"]

WORK_OPTIONS = {
    "fgvis": "max_iterations",
    "integrated_gradients": "steps",
    "smoothgrad": "samples",
    "scorecam": "top_k",
}
"""The option whose value is the number of passes of each multi-pass method."""
UPPER_BOUNDS = frozenset({"fgvis", "scorecam"})
"""Methods whose passes are at most the count: FGVis stops when its score plateaus, Score-CAM
skips constant channels."""
_PASSES = {"guided_gradcam": 2.0}
"""Single-call methods that take more than one pass."""


def passes_per_class(name: str, channels: int | None = None) -> float | None:
    """Model passes per class of method ``name`` with its default options.

    Args:
        name: a method name.
        channels: channels of Score-CAM's default layer on the served model (``None``: unknown).

    Returns:
        The number, or ``None`` when it depends on something unknown (Score-CAM's channels).
    """
    spec = describe(name)
    option = WORK_OPTIONS.get(spec.name)
    if option is None:
        return _PASSES.get(spec.name, 1.0)
    default = spec.options[option].default
    if spec.name == "scorecam":
        count = default if default is not None else channels
        return None if count is None else float(count)
    if spec.name == "smoothgrad":
        inner = spec.options["method"].default
        per = passes_per_class(inner, channels) if isinstance(inner, str) else 1.0
        return None if per is None else float(default) * per
    return float(default)


class Calibration:
    """One Grad-CAM pass timed on the served model (once, lazily), and its layer's channels."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model = model
        self.x = x
        self._lock = threading.Lock()
        self._result: tuple[float, int | None] | None = None

    def measure(self) -> tuple[float, int | None]:
        """``(seconds per pass, channels of the default layer)``, measured the first time.

        The pass is the fastest of three Grad-CAM calls on the input ``x`` (a preprocessed
        grey photo; the first call warms the model up).
        """
        with self._lock:
            if self._result is None:
                x = self.x
                method: Method = build("gradcam", self.model)
                times = []
                for _ in range(3):
                    began = time.perf_counter()
                    explanation = method(x)
                    times.append(time.perf_counter() - began)
                channels = None
                layer = explanation.layer
                if isinstance(layer, str):
                    (module,) = resolve_layers(self.model, layer)
                    with torch.inference_mode(), record_outputs([module]) as outputs:
                        self.model(x)
                    output = outputs.get(module)
                    channels = int(output.shape[1]) if output is not None else None
                self._result = (min(times), channels)
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

    def record(self, name: str, seconds: float, classes: int, options: dict[str, Any]) -> None:
        """Note a finished run of ``name``: ``seconds`` for ``classes`` classes."""
        option = WORK_OPTIONS.get(name)
        work = options.get(option) if option is not None else None
        with self._lock:
            self._last[name] = _Run(seconds / max(1, classes), work)

    def cost(self, name: str, calibration: tuple[float, int | None] | None) -> dict[str, Any]:
        """The ``cost`` entry of ``GET /api/methods`` (:class:`~.schemas.MethodCost`)."""
        channels = calibration[1] if calibration is not None else None
        passes = passes_per_class(name, channels)
        seconds = None
        if passes is not None and calibration is not None:
            seconds = passes * calibration[0]
        with self._lock:
            last = self._last.get(name)
        return {
            "passes": passes,
            "work_option": WORK_OPTIONS.get(name),
            "at_most": name in UPPER_BOUNDS,
            "seconds": seconds,
            "seconds_per_pass": calibration[0] if calibration is not None else None,
            "last_seconds": last.seconds_per_class if last is not None else None,
            "last_work": last.work if last is not None else None,
        }
