"""Confidence on the explanation image: Average Drop, Increase in Confidence, and ADCC.

The explanation image keeps what the map marks: ``E = s ⊙ x`` with ``s`` the map in [0, 1]
at input resolution and ``x`` the *normalised* input (as in Grad-CAM++ and the ADCC code).
``Y`` = softmax probability of the target class on ``x``, ``O`` = on ``E``.

* Average Drop (Chattopadhay et al. 2018) per image: ``100 · max(0, Y − O) / Y`` (lower is
  better; ``0`` when ``Y = 0``); Increase in Confidence: ``100 · 1[Y < O]`` (higher is
  better). The metrics are their means over images.
* ADCC (Poppi et al. 2021) per image, with the drop as a fraction ``AD = max(0, Y − O) / Y``:
  coherency ``Coh = (ρ(s, s') + 1) / 2`` where ``s'`` is the same method's map computed on
  ``E`` for the same class and ``ρ`` the Pearson correlation (``0`` when undefined, e.g. a flat
  map); complexity ``Com = ‖s‖₁ / P`` (mean of the map); and
  ``ADCC = 3 / (1/Coh + 1/(1 − Com) + 1/(1 − AD))``, the harmonic mean, ``0`` when a term is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.checks import check_model
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import (
    BATCH_SIZE,
    Explainer,
    Metric,
    check_explainer,
    check_unit_maps,
    make_scorer,
    metric_context,
    prepare,
    run_explainer,
)
from evidencemap.metrics.similarity import pearson
from evidencemap.targets import OutputKey, Target

__all__ = ["ADCC", "ADCCResult", "AverageDrop", "ConfidenceResult"]


@dataclass
class ConfidenceResult:
    """Per-image confidence on the explanation image.

    Attributes:
        original: ``(N,)`` target probability ``Y`` on the inputs.
        explained: ``(N,)`` target probability ``O`` on ``E = s ⊙ x``.
        drop: ``(N,)`` ``100 · max(0, Y − O) / Y`` (Average Drop is its mean).
        increase: ``(N,)`` ``100 · 1[Y < O]`` (Increase in Confidence is its mean).
        classes: ``(N,)`` the classes scored, or ``None`` for a callable target.
    """

    original: Tensor
    explained: Tensor
    drop: Tensor
    increase: Tensor
    classes: Tensor | None


def _relative_drop(y: Tensor, o: Tensor) -> Tensor:
    """``max(0, y − o) / y``, ``0`` where ``y <= 0``."""
    positive = y > 0
    return ((y - o).clamp(min=0) / y.where(positive, torch.ones_like(y))).where(
        positive, torch.zeros_like(y)
    )


@register_metric
class AverageDrop(Metric):
    """Average Drop (lower is better) and Increase in Confidence (higher is better).

    Args:
        model: the classifier.
        batch_size: inputs per forward pass.
        output_key: which model output to read.
    """

    name = "average_drop"
    higher_is_better = False
    directions: ClassVar[dict[str, bool]] = {"average_drop": False, "increase_in_confidence": True}
    titles: ClassVar[dict[str, str]] = {
        "average_drop": "Average Drop %",
        "increase_in_confidence": "Increase in Conf. %",
    }
    OPTIONS = (BATCH_SIZE,)

    def __init__(
        self, model: nn.Module, *, batch_size: int = 64, output_key: OutputKey = None
    ) -> None:
        self.model = check_model(model)
        self.batch_size = self.option("batch_size", batch_size)
        self.output_key = output_key

    def __call__(self, inputs: Tensor, maps: Any, target: Target = None) -> ConfidenceResult:
        """Score ``inputs`` and ``maps ⊙ inputs``; maps must lie in [0, 1].

        Raises:
            TypeError / ValueError: for invalid inputs, maps (outside [0, 1]) or target.
        """
        x, m = prepare(inputs, maps)
        m = check_unit_maps(m)
        with metric_context(self.model):
            scorer, y = make_scorer(
                self.model, x, target, output_key=self.output_key, batch_size=self.batch_size
            )
            o = scorer(m * x, torch.arange(x.shape[0], device=x.device))
        y, o = y.float(), o.float()
        return ConfidenceResult(
            y, o, 100 * _relative_drop(y, o), 100 * (y < o).to(y.dtype), scorer.classes
        )

    def score(self, context: MetricContext) -> MetricRecord:
        """Average Drop and Increase in Confidence of one image."""
        result = self(context.inputs, context.maps, context.target)
        return MetricRecord(
            {
                "average_drop": float(result.drop[0]),
                "increase_in_confidence": float(result.increase[0]),
            }
        )


@dataclass
class ADCCResult:
    """Per-image ADCC and its three terms (all in [0, 1]).

    Attributes:
        average_drop: ``(N,)`` ``max(0, Y − O) / Y`` (lower is better).
        coherency: ``(N,)`` ``(ρ(s, s') + 1) / 2`` (higher is better).
        complexity: ``(N,)`` ``‖s‖₁ / P`` (lower is better).
        adcc: ``(N,)`` harmonic mean of ``Coh``, ``1 − Com``, ``1 − AD`` (higher is better).
        classes: ``(N,)`` the classes, or ``None`` for a callable target.
    """

    average_drop: Tensor
    coherency: Tensor
    complexity: Tensor
    adcc: Tensor
    classes: Tensor | None


@register_metric
class ADCC(Metric):
    """ADCC: Average Drop, Coherency and Complexity, combined by their harmonic mean.

    Args:
        model: the classifier.
        batch_size: inputs per forward pass.
        output_key: which model output to read.
    """

    name = "adcc"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {
        "adcc": True,
        "adcc_average_drop": False,
        "coherency": True,
        "complexity": False,
    }
    titles: ClassVar[dict[str, str]] = {
        "adcc": "ADCC",
        "adcc_average_drop": "ADCC drop",
        "coherency": "Coherency",
        "complexity": "Complexity",
    }
    needs = frozenset({"maps", "explainer"})
    OPTIONS = (BATCH_SIZE,)

    def __init__(
        self, model: nn.Module, *, batch_size: int = 64, output_key: OutputKey = None
    ) -> None:
        self.model = check_model(model)
        self.batch_size = self.option("batch_size", batch_size)
        self.output_key = output_key

    def __call__(
        self, inputs: Tensor, maps: Any, explainer: Explainer, target: Target = None
    ) -> ADCCResult:
        """ADCC of ``maps``; ``explainer(inputs, target)`` re-runs the method on ``s ⊙ x``.

        Args:
            inputs: ``(N, C, *S)`` normalised inputs.
            maps: the method's maps on ``inputs`` in [0, 1].
            explainer: the method, e.g. ``evidencemap.GradCAM(model)``; it is called with the
                explanation images and the classes (or callable target) scored here.
            target: as in :mod:`evidencemap.metrics.common`.

        Raises:
            TypeError / ValueError: for invalid arguments or maps outside [0, 1].
        """
        x, m = prepare(inputs, maps)
        m = check_unit_maps(m)
        explainer = check_explainer(explainer)
        explained = m * x
        with metric_context(self.model):
            scorer, y = make_scorer(
                self.model, x, target, output_key=self.output_key, batch_size=self.batch_size
            )
            o = scorer(explained, torch.arange(x.shape[0], device=x.device))
        again = run_explainer(explainer, explained, scorer.target())
        drop = _relative_drop(y.float(), o.float())
        coherency = (pearson(m, again).float() + 1) / 2
        complexity = m.flatten(1).mean(1).float()
        terms = torch.stack([coherency, 1 - complexity, 1 - drop])
        ok = (terms > 0).all(0)
        adcc = (3 / terms.where(ok, torch.ones_like(terms)).reciprocal().sum(0)).where(
            ok, torch.zeros_like(drop)
        )
        return ADCCResult(drop, coherency, complexity, adcc, scorer.classes)

    def score(self, context: MetricContext) -> MetricRecord:
        """ADCC and its three terms for one image (the explainer re-runs on ``s ⊙ x``)."""
        result = self(context.inputs, context.maps, context.explainer, context.target)
        return MetricRecord(
            {
                "adcc": float(result.adcc[0]),
                "adcc_average_drop": float(result.average_drop[0]),
                "coherency": float(result.coherency[0]),
                "complexity": float(result.complexity[0]),
            }
        )
