"""The evaluation runner: every method × every registered metric on a set of images.

``evaluate`` explains each image (its top-1 class) with each method, hands each registered
metric a :class:`~evidencemap.metrics.base.MetricContext` and collects the
:class:`~evidencemap.metrics.base.MetricRecord` it returns, in one loop over the metrics the
caller chose; nothing here names a metric. A method that does not apply to the model is left
out (with the reason); one that fails is reported in the results and the others go on.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from evidencemap.checks import check_model
from evidencemap.evaluation.inputs import (
    boxes_by_class,
    check_images,
    check_names,
    make_explainer,
    select_methods,
)
from evidencemap.evaluation.inputs import method_options as options_per_method
from evidencemap.evaluation.report import EvaluationResults
from evidencemap.metrics import Cost
from evidencemap.metrics.base import (
    Metric,
    MetricContext,
    MetricRecord,
    get_metric,
    metric_names,
    metric_settings,
)
from evidencemap.metrics.common import Explainer
from evidencemap.runtime import RunCancelledError

__all__ = ["TARGET", "default_metrics", "evaluate", "evaluation_settings"]

TARGET = "top-1 class of each image (softmax probability for the curves)"
"""What every method explains and every metric scores."""

# errors that stop the whole evaluation instead of one method: the caller asked to stop
_STOP = (RunCancelledError, KeyboardInterrupt)


def default_metrics(boxes: Any) -> list[str]:
    """Every registered metric, those that need boxes only when ``boxes`` are given."""
    return [m for m in metric_names() if boxes or "boxes" not in get_metric(m).needs]


def evaluation_settings(
    metrics: Sequence[str],
    *,
    quick: bool,
    given: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """metric → its option values in this protocol (:func:`metric_settings`), ``given`` last.

    Raises:
        TypeError: for ``given`` that is not a mapping metric → options.
        ValueError: for a metric in ``given`` that is not evaluated, or an option it refuses.
    """
    if given is not None and not isinstance(given, Mapping):
        raise TypeError("metric_options must be a mapping metric name → options")
    given = dict(given or {})
    extra = [name for name in given if name not in metrics]
    if extra:
        raise ValueError(
            f"metric_options names {extra[0]!r}, which is not among the metrics {list(metrics)}"
        )
    out = {}
    for name in metrics:
        options = given.get(name, {})
        if not isinstance(options, Mapping):
            raise TypeError(f"metric_options[{name!r}] must be a mapping option → value")
        out[name] = metric_settings(get_metric(name), quick=quick, given=options)
    return out


@dataclass
class _Collected:
    """What the loop gathers for one method (kept only when the method finishes)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    pointing: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    images: Sequence[tuple[str, Tensor]],
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    boxes: Mapping[str, Sequence[Sequence[float]]] | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    out_dir: str | Path | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    seed: int = 0,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvaluationResults:
    """Evaluate ``methods`` on ``images`` with ``metrics`` (module docstring).

    Args:
        model: the classifier (used as given; its mode and parameters are left as found).
        images: ``(name, tensor)`` pairs, each tensor one normalised input ``(C, H, W)`` or
            ``(C, D, H, W)``.
        methods: registered method names (default: every registered method that applies to
            ``model``; the others are listed in ``results.skipped`` with the reason). A method
            named here that does not apply, or that raises, is listed in ``results.failed``
            and the others still run.
        metrics: registered metric names (:func:`evidencemap.metrics.metric_names`; default:
            all, those that need boxes only when ``boxes`` are given).
        boxes: image name → ``[[x0, y0, x1, y1, class], …]`` in model-input pixels (2-D only).
        quick: the short protocol (each metric's ``QUICK`` settings, and
            :data:`QUICK_METHOD_OPTIONS`).
        progress: show a tqdm progress bar.
        out_dir: where to write the tables and plots (nothing written when ``None``).
        method_options: method name → options for its constructor (``layer`` included); they
            override quick mode's defaults.
        device: where to run (default: the model's device).
        batch_size: perturbed inputs per forward pass in the metrics.
        seed: seed of every random choice.
        metric_options: metric name → option values (checked by the metric's ``Option``\\ s);
            they override the protocol's.

    Returns:
        The :class:`EvaluationResults` (also written to ``out_dir`` when given).

    Raises:
        TypeError / ValueError: for invalid arguments (unknown method or metric, boxes without
            the images they name, a metric that needs boxes without them, …).
    """
    model = check_model(model)
    images = check_images(images)
    run, skipped, failed = select_methods(model, methods)
    metrics = check_names(
        default_metrics(boxes) if metrics is None else metrics, metric_names(), "metrics"
    )
    boxed = sorted(m for m in metrics if "boxes" in get_metric(m).needs)
    if boxed and not boxes:
        raise ValueError(f"metrics {boxed} need boxes")
    boxes_by = _check_boxes(boxes, images)
    device = _device(model, device)
    settings: dict[str, Any] = {"quick": bool(quick), "seed": int(seed)}
    settings["batch_size"] = int(batch_size)
    settings["metrics"] = evaluation_settings(metrics, quick=bool(quick), given=metric_options)
    settings["target"] = TARGET
    options = options_per_method(run, method_options, bool(quick), ignored=[*skipped, *failed])
    settings["method_options"] = options
    common = {"batch_size": int(batch_size), "seed": int(seed), "device": device}
    tools = {
        m: get_metric(m).for_evaluation(model, settings["metrics"][m], common) for m in metrics
    }
    # every method built now: an option it refuses is the caller's error, raised before any work
    explainers = {m: make_explainer(model, m, options[m]) for m in run}
    columns = [c for m in metrics for c in get_metric(m).titles]
    results = EvaluationResults([], [], {}, settings, [], columns, skipped=skipped, failed=failed)
    _run_all(results, model, explainers, images, tools, boxes_by, device, progress)
    if out_dir is not None:
        results.write(out_dir)
    return results


def _run_all(
    results: EvaluationResults,
    model: nn.Module,
    explainers: Mapping[str, Explainer],
    images: list[tuple[str, Tensor]],
    tools: Mapping[str, Metric],
    boxes: Mapping[str, Mapping[int, list[list[float]]]],
    device: torch.device,
    progress: bool,
) -> None:
    """Every method in turn into ``results``; a method that raises goes to ``results.failed``."""
    run = list(explainers)
    bar = tqdm(total=len(run) * len(images), disable=not progress, desc="evaluate", unit="map")
    try:
        for method in run:
            start = bar.n
            try:
                collected = _run_method(
                    model, method, explainers[method], images, tools, boxes, device, bar
                )
            except _STOP:
                raise
            except Exception as err:  # reported in the results; the other methods go on
                results.failed[method] = f"{type(err).__name__}: {err}"
                if progress:
                    bar.write(
                        f"evaluate: {method} failed ({results.failed[method]}); going on",
                        file=sys.stderr,
                    )
                bar.update(start + len(images) - bar.n)
                continue
            results.methods.append(method)
            results.records.extend(collected.records)
            results.pointing.extend(collected.pointing)
            results.curves[method] = collected.curves
            results.warnings.extend(collected.warnings)
    finally:
        bar.close()


def _check_boxes(
    boxes: Mapping[str, Sequence[Sequence[float]]] | None, images: list[tuple[str, Tensor]]
) -> dict[str, dict[int, list[list[float]]]]:
    """Image name → class → boxes, for images that are evaluated."""
    if not boxes:
        return {}
    if not isinstance(boxes, Mapping):
        raise TypeError("boxes must be a mapping image name → list of [x0, y0, x1, y1, class]")
    unknown = set(boxes) - {n for n, _ in images}
    if unknown:
        raise ValueError(f"boxes name images that are not evaluated: {sorted(unknown)}")
    return {n: boxes_by_class(v, n) for n, v in boxes.items()}


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` (default: the model's), which must be the model's."""
    model_device = next((p.device for p in model.parameters()), None)
    chosen = torch.device(device) if device is not None else model_device or torch.device("cpu")
    if model_device is not None and model_device != chosen:
        raise ValueError(
            f"device {chosen} differs from the model's device {model_device}; move the model "
            "there first (model.to(device))"
        )
    return chosen


def _run_method(
    model: nn.Module,
    method: str,
    explainer: Explainer,
    images: list[tuple[str, Tensor]],
    tools: Mapping[str, Metric],
    boxes: Mapping[str, Mapping[int, list[list[float]]]],
    device: torch.device,
    bar: tqdm,
) -> _Collected:
    """Every metric on every image for one method; each distinct warning once per image."""
    out = _Collected()
    for index, (name, tensor) in enumerate(images):
        x = tensor.unsqueeze(0).to(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if index == 0:
                explainer(x, None)  # warm-up, not measured
            context = _context(model, explainer, x, boxes.get(name), device)
            record: dict[str, Any] = {"image": name, "method": method}
            record["class"] = None if context.target is None else int(context.target[0])
            per_class: dict[int, dict[str, Any]] = {}
            for metric, tool in tools.items():
                bar.set_postfix_str(f"{method} · {name} · {metric}")
                if "boxes" in tool.needs and not context.boxes:
                    continue
                _merge(tool.score(context), record, per_class, out.curves)
        out.records.append(record)
        out.pointing.extend(
            {"image": name, "method": method, "class": c, **v} for c, v in per_class.items()
        )
        out.warnings.extend(_warn_once(caught, method, name))
        bar.update(1)
    return out


def _context(
    model: nn.Module,
    explainer: Explainer,
    x: Tensor,
    boxes: Mapping[int, list[list[float]]] | None,
    device: torch.device,
) -> MetricContext:
    """The method's map of ``x`` (timed) and what the metrics read with it."""
    explanation, cost = Cost(device)(lambda: explainer(x, None), images=1)
    maps = getattr(explanation, "maps", explanation)
    classes = getattr(explanation, "targets", None)
    target = classes if isinstance(classes, Tensor) else None
    return MetricContext(
        model, x, maps, target, explainer, boxes, cost.seconds_per_image, cost.peak_bytes, device
    )


def _merge(
    found: MetricRecord,
    record: dict[str, Any],
    per_class: dict[int, dict[str, Any]],
    curves: dict[str, Any],
) -> None:
    """Add one metric's record of one image to the image's row, class entries and curves."""
    record.update({k: _finite(v) for k, v in found.columns.items()})
    for cls, values in found.per_class.items():
        per_class.setdefault(cls, {}).update(values)
    for key, curve in found.curves.items():  # per image (fractions depend on the size)
        curves.setdefault(key, []).append([_finite(v) for v in curve])
    for key, levels in found.levels.items():  # the same for every image
        curves[key] = list(levels)


def _warn_once(
    caught: list[warnings.WarningMessage], method: str, image: str
) -> list[dict[str, str]]:
    """Issue each distinct warning of one (method, image) run once; return them as dicts."""
    seen: dict[tuple[type[Warning], str], warnings.WarningMessage] = {}
    for w in caught:
        seen.setdefault((w.category, str(w.message)), w)
    for w in seen.values():
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [
        {"method": method, "image": image, "category": c.__name__, "message": m} for c, m in seen
    ]


def _finite(value: Any) -> Any:
    """``value``, or ``None`` where a metric gave NaN / ±inf (never written as a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
