"""Run every method × metric on a set of images and write the tables, curves and numbers.

``evaluate(model, images, methods, metrics)`` explains each image (its top-1 class) with each
method, scores the maps with each registered metric (:mod:`evidencemap.metrics`,
``@register_metric``), and returns an :class:`EvaluationResults`; with ``out_dir`` it writes

* ``summary.md`` / ``summary.csv``: mean ± sample standard deviation over images per method
  and column, ↑ / ↓ marking the better direction (best mean in bold in the Markdown table);
* ``per_image.csv`` / ``per_image.json``: every number per (image, method), the JSON with the
  curves, the settings, the methods left out or failed and the warnings;
* ``deletion_insertion.png`` and ``road.png``: the mean curves per method.

Methods are looked up by name (:func:`evidencemap.get_method`); by default every method that
applies to the model runs. ``method_options`` passes options per method name,
``metric_options`` per metric name. ``quick=True`` runs each metric's quick protocol (its
``QUICK`` settings: fewer curve steps, ROAD levels and a looser ROAD imputation tolerance,
fewer randomisation stages and sensitivity samples) and gives slow methods the fast options of
:data:`QUICK_METHOD_OPTIONS` (e.g. Score-CAM ``top_k=32``); the settings used are part of the
results and of ``summary.md``.

The package holds the runner (:mod:`.runner`, one loop over the registered metrics), what it
is given (:mod:`.inputs`) and the report writers (:mod:`.report`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from evidencemap.evaluation.inputs import QUICK_METHOD_OPTIONS, make_explainer, to_input_boxes
from evidencemap.evaluation.report import COLUMNS, EvaluationResults, line_style
from evidencemap.evaluation.runner import (
    TARGET,
    default_metrics,
    evaluate,
    evaluation_settings,
)
from evidencemap.metrics.base import metric_names


class _MetricNames(Sequence[str]):
    """The registered metric names, in table order, read from the registry each time."""

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return tuple(metric_names())[index]

    def __len__(self) -> int:
        return len(metric_names())

    def __iter__(self) -> Iterator[str]:
        return iter(metric_names())

    def __contains__(self, name: object) -> bool:
        return name in metric_names()

    def __repr__(self) -> str:
        return repr(tuple(metric_names()))


METRIC_NAMES: Sequence[str] = _MetricNames()
"""The metrics :func:`evaluate` knows, in table order (the registry, read live)."""

__all__ = [
    "COLUMNS",
    "METRIC_NAMES",
    "QUICK_METHOD_OPTIONS",
    "TARGET",
    "EvaluationResults",
    "default_metrics",
    "evaluate",
    "evaluation_settings",
    "line_style",
    "make_explainer",
    "to_input_boxes",
]
