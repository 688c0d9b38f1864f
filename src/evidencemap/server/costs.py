"""The expected cost of each method on the served model, shown before it runs.

A method's cost is counted in **model passes per explained class**, of one of three kinds:

* ``"layer"``: one Grad-CAM call — a forward and a backward from the explained layer only
  (the CAM family; the library's gradient CAMs backpropagate through the head alone);
* ``"input"``: one saliency call — a forward and a full backward to the input (saliency, guided
  backprop, Integrated Gradients, SmoothGrad of saliency, FGVis, guided Grad-CAM);
* ``"forward"``: one forward without gradients (Score-CAM's masked inputs).

Grad-CAM and its family take one pass; the others as many as their work option says (FGVis
``max_iterations``, at most — it stops earlier when the score plateaus; Integrated Gradients
``steps``; SmoothGrad ``samples`` times the wrapped method; Score-CAM one masked forward per
channel of its layer, or ``top_k``, at most — constant channels cost none). The service times
one pass of each kind on the served model once (:class:`Calibration`) and multiplies:
``seconds ≈ passes × seconds per pass``. That is an estimate for an idle machine, per class
(``top_k`` classes cost ``k`` times as much); ``last_seconds``, the time the latest run of that
method on this service actually took per class, is the measurement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evidencemap.capture import record_outputs
from evidencemap.layers import resolve_layers
from evidencemap.methods import build, describe

__all__ = ["PASS_KINDS", "UPPER_BOUNDS", "WORK_OPTIONS", "Calibration", "CostBook", "pass_count"]

PASS_KINDS = ("layer", "input", "forward")
"""The kinds of pass a cost is counted in (see the module docstring)."""
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
_KINDS = {
    "saliency": "input",
    "guided_backprop": "input",
    "guided_gradcam": "input",
    "integrated_gradients": "input",
    "fgvis": "input",
    "scorecam": "forward",
}
"""The kind of pass of each method not counted in ``"layer"`` passes."""
_PASSES = {"guided_gradcam": 2.0}
"""Single-call methods that take more than one pass."""


def pass_count(name: str, channels: int | None = None) -> tuple[float | None, str]:
    """Passes per class of method ``name`` with its default options, and their kind.

    Args:
        name: a method name.
        channels: channels of Score-CAM's default layer on the served model (``None``: unknown).

    Returns:
        ``(passes, kind)``; ``passes`` is ``None`` when it depends on something unknown
        (Score-CAM's channels).
    """
    spec = describe(name)
    kind = _KINDS.get(spec.name, "layer")
    option = WORK_OPTIONS.get(spec.name)
    if option is None:
        return _PASSES.get(spec.name, 1.0), kind
    default = spec.options[option].default
    if spec.name == "scorecam":
        count = default if default is not None else channels
        return (None if count is None else float(count)), kind
    if spec.name == "smoothgrad":
        inner = spec.options["method"].default
        per, kind = pass_count(inner, channels) if isinstance(inner, str) else (1.0, "input")
        return (None if per is None else float(default) * per), kind
    return float(default), kind


def _fastest(call: Callable[[], object], repeats: int = 2) -> float:
    """Seconds of the fastest of ``repeats`` calls (the first one also warms up)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return min(times)


class Calibration:
    """One pass of each kind timed on the served model (once, lazily), and the channels of
    the layer the CAM methods explain by default."""

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
                gradcam = build("gradcam", self.model)
                saliency = build("saliency", self.model)

                def forward() -> None:
                    with torch.inference_mode():
                        self.model(x)

                seconds = {
                    "layer": _fastest(lambda: gradcam(x)),
                    "input": _fastest(lambda: saliency(x)),
                    "forward": _fastest(forward),
                }
                channels = None
                layer = gradcam(x).layer
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

    def record(self, name: str, seconds: float, classes: int, options: dict[str, Any]) -> None:
        """Note a finished run of ``name``: ``seconds`` for ``classes`` classes."""
        option = WORK_OPTIONS.get(name)
        work = options.get(option) if option is not None else None
        with self._lock:
            self._last[name] = _Run(seconds / max(1, classes), work)

    def cost(
        self, name: str, calibration: tuple[dict[str, float], int | None] | None
    ) -> dict[str, Any]:
        """The ``cost`` entry of ``GET /api/methods`` (:class:`~.schemas.MethodCost`)."""
        channels = calibration[1] if calibration is not None else None
        passes, kind = pass_count(name, channels)
        per_pass = calibration[0][kind] if calibration is not None else None
        with self._lock:
            last = self._last.get(name)
        return {
            "passes": passes,
            "pass_kind": kind,
            "work_option": WORK_OPTIONS.get(name),
            "at_most": name in UPPER_BOUNDS,
            "seconds": None if passes is None or per_pass is None else passes * per_pass,
            "seconds_per_pass": per_pass,
            "last_seconds": last.seconds_per_class if last is not None else None,
            "last_work": last.work if last is not None else None,
        }
