"""Deletion and insertion curves (Petsiuk et al. 2018, the RISE protocol) and their AUC.

Positions ``p`` of the ``P = prod(S)`` spatial positions are ranked by the map (most salient
first; all channels move together). With ``n_k = min(k · step, P)`` and ``T = ceil(P / step)``:

* **deletion**: ``x_k`` = ``x`` with its first ``n_k`` ranked positions replaced by the
  substrate (default: ``0`` in the normalised input space, the data mean); lower AUC is better;
* **insertion**: ``x_k`` = the substrate (default: ``x`` blurred by a Gaussian of 11 taps and
  ``σ = 5`` per channel and axis) with its first ``n_k`` ranked positions copied from ``x``;
  higher AUC is better.

The curve is the score ``s_k`` (softmax probability of the target class) for ``k = 0 … T``
against the fraction ``n_k / P``; AUC = trapezoid rule on that [0, 1] axis, which for
``P`` divisible by ``step`` is RISE's ``(Σ_k s_k − s_0/2 − s_T/2) / T``. All ``N·(T+1)``
perturbed inputs are built on the device chunk by chunk and scored ``batch_size`` at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.checks import check_model
from evidencemap.filters import gaussian_filter
from evidencemap.methods.options import Option
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import (
    BATCH_SIZE,
    SEED,
    Metric,
    make_scorer,
    metric_context,
    prepare,
    rank_positions,
)
from evidencemap.references import REFERENCES, check_reference, reference_image
from evidencemap.targets import OutputKey, Target

__all__ = ["CurveResult", "Deletion", "Insertion", "auc", "gaussian_blur"]

# Steps of the RISE protocol for a 224 × 224 image (one row's worth of pixels per step).
_DEFAULT_STEPS = 224


def gaussian_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """The RISE blur of ``(N, C, *S)``: a separable Gaussian of ``size`` taps, zero padding.

    Kernel ``k_t ∝ exp(−t² / 2σ²)``, ``t = −(size−1)/2 … (size−1)/2``, summed to 1 per axis
    (as in the RISE code); :func:`evidencemap.filters.gaussian_filter` with
    ``radius = (size − 1) / 2`` and ``padding="zero"``.

    Raises:
        ValueError: for an even or non-positive ``size``, ``sigma <= 0``, or inputs without 1 to
            3 spatial axes.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd int >= 1, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if x.ndim - 2 not in (1, 2, 3):
        raise ValueError(f"x must be (N, C, *S) with 1 to 3 spatial axes, got {tuple(x.shape)}")
    return gaussian_filter(x, sigma, radius=(size - 1) // 2, padding="zero")


def auc(curves: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Trapezoid area under ``curves`` ``(N, T+1)`` over ``fractions`` (default uniform on [0, 1]).

    Raises:
        ValueError: for curves with fewer than 2 points or mismatched fractions.
    """
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must be (N, T+1) with T >= 1, got {tuple(curves.shape)}")
    if fractions is None:
        fractions = torch.linspace(0, 1, curves.shape[1], device=curves.device, dtype=curves.dtype)
    if fractions.shape != (curves.shape[1],):
        raise ValueError(
            f"fractions must have shape ({curves.shape[1]},), got {tuple(fractions.shape)}"
        )
    widths = fractions[1:] - fractions[:-1]
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * widths).sum(1)


@dataclass
class CurveResult:
    """A deletion or insertion run.

    Attributes:
        curves: ``(N, T+1)`` target scores after each step (``curves[:, 0]`` on the start image).
        fractions: ``(T+1,)`` share of positions changed at each step, from 0 to 1.
        auc: ``(N,)`` trapezoid area under each curve.
        classes: ``(N,)`` the classes scored, or ``None`` for a callable target.
    """

    curves: Tensor
    fractions: Tensor
    auc: Tensor
    classes: Tensor | None


class _CausalCurve(Metric):
    """Shared machinery of :class:`Deletion` and :class:`Insertion`."""

    default_substrate: ClassVar[str] = "zero"
    supports_volumes = True
    OPTIONS = (
        Option(
            "step",
            "int",
            None,
            "positions changed per step (None: from steps)",
            low=1,
            nullable=True,
        ),
        Option(
            "steps",
            "int",
            None,
            f"steps of the curve when step is None: step = ceil(P / steps) (None: {_DEFAULT_STEPS})",
            low=1,
            nullable=True,
            cost="work",
        ),
        Option(
            "substrate",
            "str",
            None,
            "what changed positions become (None: the metric's default)",
            choices=REFERENCES,
            nullable=True,
            other="a number or a tensor broadcastable to the inputs",
        ),
        BATCH_SIZE,
        SEED,
    )
    EVALUATION: ClassVar[dict[str, Any]] = {"steps": _DEFAULT_STEPS}
    QUICK: ClassVar[dict[str, Any]] = {"steps": 16}

    def __init__(
        self,
        model: nn.Module,
        *,
        step: int | None = None,
        substrate: str | float | Tensor | None = None,
        batch_size: int = 64,
        output_key: OutputKey = None,
        seed: int = 0,
        steps: int | None = None,
    ) -> None:
        self.model = check_model(model)
        self.step = self.option("step", step)
        self.steps = self.option("steps", steps)
        substrate = self.default_substrate if substrate is None else substrate
        self.substrate = check_reference(substrate, "substrate")
        self.batch_size = self.option("batch_size", batch_size)
        self.output_key = output_key
        self.seed = self.option("seed", seed)

    def substrate_of(self, x: Tensor) -> Tensor:
        """The substrate image ``(N, C, *S)`` for inputs ``x`` (:mod:`evidencemap.references`;
        ``"blur"`` is the RISE blur, :func:`gaussian_blur`)."""
        if isinstance(self.substrate, str) and self.substrate == "blur":
            return gaussian_blur(x)
        return reference_image(x, self.substrate, name="substrate")

    def _ends(self, x: Tensor, substrate: Tensor) -> tuple[Tensor, Tensor]:
        """(image where the positions are *not yet* changed, image they change into)."""
        raise NotImplementedError

    def steps_of(self, positions: int) -> int:
        """Positions changed per step for ``positions`` spatial positions: ``step``, else
        ``ceil(positions / steps)`` (``steps`` default 224)."""
        if self.step is not None:
            return int(self.step)
        return max(1, math.ceil(positions / (self.steps or _DEFAULT_STEPS)))

    def __call__(self, inputs: Tensor, maps: Any, target: Target = None) -> CurveResult:
        """Run the curve on ``inputs`` ``(N, C, *S)`` ranked by ``maps``.

        Raises:
            TypeError / ValueError: for invalid inputs, maps or target.
        """
        x, m = prepare(inputs, maps)
        n = x.shape[0]
        positions = m[0].numel()
        step = self.steps_of(positions)
        count = math.ceil(positions / step)
        changed = (torch.arange(count + 1, device=x.device) * step).clamp(max=positions)
        with metric_context(self.model):
            scorer, _ = make_scorer(
                self.model, x, target, output_key=self.output_key, batch_size=self.batch_size
            )
            order = rank_positions(m, descending=True, seed=self.seed)
            ranks = torch.empty_like(order).scatter_(
                1, order, torch.arange(positions, device=x.device).expand(n, positions)
            )
            before, after = self._ends(x, self.substrate_of(x))
            sample = torch.arange(n, device=x.device).repeat_interleave(count + 1)
            k = torch.arange(count + 1, device=x.device).repeat(n)
            scores = []
            for s in range(0, sample.shape[0], self.batch_size):
                i, j = sample[s : s + self.batch_size], k[s : s + self.batch_size]
                mask = (ranks[i] < changed[j, None]).view(i.shape[0], 1, *x.shape[2:])
                scores.append(scorer(torch.where(mask, after[i], before[i]), i))
            curves = torch.cat(scores).view(n, count + 1).float()
        fractions = changed.to(curves.dtype) / positions
        return CurveResult(curves, fractions, auc(curves, fractions), scorer.classes)

    def score(self, context: MetricContext) -> MetricRecord:
        """The AUC column and the curve of one image (:meth:`__call__` on the method's map)."""
        result = self(context.inputs, context.maps, context.target)
        return MetricRecord(
            {f"{self.name}_auc": float(result.auc[0])},
            curves={
                self.name: result.curves[0].tolist(),
                f"{self.name}_fractions": result.fractions.tolist(),
            },
        )


@register_metric
class Deletion(_CausalCurve):
    """Deletion curve and AUC (lower is better); see the module docstring.

    Args:
        model: the classifier.
        step: positions removed per step (default ``ceil(P / steps)``).
        steps: the number of steps when ``step`` is ``None`` (default 224: 224 pixels per step
            for 224 × 224, RISE's protocol; the evaluation's quick protocol uses 16).
        substrate: what removed positions become: ``"zero"`` (default; the mean of the
            normalised data), ``"blur"``, ``"mean"`` (the image's channel means), a number or a
            tensor broadcastable to the inputs.
        batch_size: perturbed inputs per forward pass.
        output_key: which model output to read.
        seed: seed of the random order among tied map values.
    """

    name = "deletion"
    higher_is_better = False
    directions: ClassVar[dict[str, bool]] = {"deletion_auc": False}
    titles: ClassVar[dict[str, str]] = {"deletion_auc": "Deletion AUC"}
    default_substrate = "zero"

    def _ends(self, x: Tensor, substrate: Tensor) -> tuple[Tensor, Tensor]:
        return x, substrate


@register_metric
class Insertion(_CausalCurve):
    """Insertion curve and AUC (higher is better); see the module docstring.

    Args: as :class:`Deletion`, but ``substrate`` is the start image (default ``"blur"``:
    Gaussian 11 taps, σ = 5).
    """

    name = "insertion"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {"insertion_auc": True}
    titles: ClassVar[dict[str, str]] = {"insertion_auc": "Insertion AUC"}
    default_substrate = "blur"

    def _ends(self, x: Tensor, substrate: Tensor) -> tuple[Tensor, Tensor]:
        return substrate, x
