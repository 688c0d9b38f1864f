"""Deletion and insertion curves (Petsiuk et al. 2018, the RISE protocol) and their AUC.

Positions ``p`` of the ``P = prod(S)`` spatial positions are ranked by the map (most salient
first; all channels move together). With ``n_k = min(k · step, P)`` and ``T = ceil(P / step)``:

* **deletion**: ``x_k`` = ``x`` with its first ``n_k`` ranked positions replaced by the
  substrate (default: ``0`` in the normalised input space, the data mean); lower AUC is better;
* **insertion**: ``x_k`` = the substrate (default ``"blur"``: ``x`` blurred by a Gaussian
  truncated to 11 taps, ``σ = 5``, per channel and axis, zero padding) with its first ``n_k``
  ranked positions copied from ``x``; higher AUC is better.

Substrates: every reference of :mod:`evidencemap.references` (``"zero"``, ``"blur"``,
``"mean"``, a number, a tensor) and ``"rise_gkern"``, the RISE code's own blur
(:func:`rise_blur`: ``gkern(11, 5)``, a Dirac smoothed by scipy's ``gaussian_filter`` with
reflected tails, applied with zero padding). The RISE code (``Evaluation.ipynb``) deletes to
``torch.zeros_like`` of the normalised image (our ``"zero"``, the data mean) and inserts from
``gkern(11, 5)``'s blur (our ``"rise_gkern"``); our ``"blur"`` is a plain truncated Gaussian,
much less flat than RISE's (edge tap / centre tap 0.61 against 0.94 per axis: RISE's is
nearly an 11-tap box filter), and insertion AUCs
with the two differ by a few hundredths.

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
from evidencemap.filters import gaussian_filter, rise_kernel1d, separable_filter
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

__all__ = [
    "SUBSTRATE",
    "SUBSTRATES",
    "CurveResult",
    "Deletion",
    "Insertion",
    "auc",
    "check_substrate",
    "gaussian_blur",
    "rise_blur",
    "substrate_image",
]

# Steps of the RISE protocol for a 224 × 224 image (one row's worth of pixels per step).
_DEFAULT_STEPS = 224

SUBSTRATES = (*REFERENCES, "rise_gkern")
"""The named substrates of the deletion-style metrics: the references and ``"rise_gkern"``."""


def gaussian_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """The ``"blur"`` substrate of ``(N, C, *S)``: a Gaussian truncated to ``size`` taps, zero
    padding (insertion's default; *not* the RISE code's kernel, see :func:`rise_blur`).

    Kernel ``k_t ∝ exp(−t² / 2σ²)``, ``t = −(size−1)/2 … (size−1)/2``, summed to 1 per axis;
    :func:`evidencemap.filters.gaussian_filter` with ``radius = (size − 1) / 2`` and
    ``padding="zero"``.

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


def rise_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """The ``"rise_gkern"`` substrate of ``(N, C, *S)``: the RISE code's blur, exactly.

    RISE (``evaluation.py``, ``Evaluation.ipynb``) blurs with ``conv2d(x, gkern(11, 5),
    padding=5)``: each channel on its own, zero padding, the kernel ``k ⊗ k`` of
    :func:`evidencemap.filters.rise_kernel1d` (a Dirac smoothed by scipy's
    ``gaussian_filter(σ = 5)``, whose tails beyond the 11 taps reflect back in). Here it is
    applied as one 1-D convolution per axis (3-D volumes: ``k ⊗ k ⊗ k``), the kernel computed
    in torch (no scipy at run time).

    Raises:
        ValueError: for an even or non-positive ``size``, ``sigma <= 0``, or inputs without 1 to
            3 spatial axes.
    """
    if x.ndim - 2 not in (1, 2, 3):
        raise ValueError(f"x must be (N, C, *S) with 1 to 3 spatial axes, got {tuple(x.shape)}")
    kernel = rise_kernel1d(size, sigma, dtype=torch.float64)
    return separable_filter(x, kernel.to(x.dtype), padding="zero")


def check_substrate(value: Any, name: str = "substrate") -> str | float | Tensor:
    """A substrate: a name of :data:`SUBSTRATES`, a number or a finite tensor.

    Raises:
        TypeError / ValueError: otherwise (:func:`evidencemap.references.check_reference`).
    """
    if isinstance(value, str) and value == "rise_gkern":
        return value
    if isinstance(value, str) and value not in REFERENCES:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, SUBSTRATES))}, a number or a tensor, "
            f"got {value!r}"
        )
    return check_reference(value, name)


def substrate_image(x: Tensor, substrate: str | float | Tensor) -> Tensor:
    """The substrate ``(N, C, *S)`` for inputs ``x``: ``"blur"`` is :func:`gaussian_blur`,
    ``"rise_gkern"`` :func:`rise_blur`, the others :func:`~evidencemap.references.reference_image`."""
    if isinstance(substrate, str) and substrate == "blur":
        return gaussian_blur(x)
    if isinstance(substrate, str) and substrate == "rise_gkern":
        return rise_blur(x)
    return reference_image(x, substrate, name="substrate")


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


SUBSTRATE = Option(
    "substrate",
    "str",
    None,
    "what changed positions become (None: the metric's default)",
    choices=SUBSTRATES,
    nullable=True,
    other="a number or a tensor broadcastable to the inputs",
)
"""The ``substrate`` option of the deletion-style metrics."""


def step_options(unit: str, count: str, default: str) -> tuple[Option, Option]:
    """The ``step`` and ``steps`` options of a curve over ``count`` ``unit`` (``"positions"``,
    ``"P"``; ``"patches"``, ``"G"``); ``default``: what ``steps=None`` means."""
    return (
        Option("step", "int", None, f"{unit} changed per step (None: from steps)", low=1,
               nullable=True),
        Option(
            "steps", "int", None,
            f"steps of the curve when step is None: step = ceil({count} / steps) (None: "
            f"{default})",
            low=1, nullable=True, cost="work",
        ),
    )  # fmt: skip


def inverse_permutation(order: Tensor) -> Tensor:
    """``ranks`` ``(N, K)`` with ``ranks[n, order[n, i]] = i``: each item's place in ``order``."""
    n, k = order.shape
    positions = torch.arange(k, device=order.device).expand(n, k)
    return torch.empty_like(order).scatter_(1, order, positions)


class _CausalCurve(Metric):
    """Shared machinery of :class:`Deletion` and :class:`Insertion`."""

    default_substrate: ClassVar[str] = "zero"
    default_steps: ClassVar[int | None] = _DEFAULT_STEPS
    """Steps of the curve when neither ``step`` nor ``steps`` is given (``None``: one unit
    per step)."""
    supports_volumes = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        *step_options("positions", "P", str(_DEFAULT_STEPS)),
        SUBSTRATE,
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
        self.substrate = check_substrate(substrate, "substrate")
        self.batch_size = self.option("batch_size", batch_size)
        self.output_key = output_key
        self.seed = self.option("seed", seed)

    def substrate_of(self, x: Tensor) -> Tensor:
        """The substrate image ``(N, C, *S)`` for inputs ``x`` (:func:`substrate_image`)."""
        return substrate_image(x, self.substrate)

    def _ends(self, x: Tensor, substrate: Tensor) -> tuple[Tensor, Tensor]:
        """(image where the positions are *not yet* changed, image they change into)."""
        raise NotImplementedError

    def steps_of(self, units: int) -> int:
        """Units (positions, patches) changed per step for ``units`` of them: ``step``, else
        ``ceil(units / steps)`` (``steps`` default :attr:`default_steps`; ``None``: 1)."""
        if self.step is not None:
            return int(self.step)
        steps = self.steps or self.default_steps
        return 1 if steps is None else max(1, math.ceil(units / steps))

    def changes(
        self, units: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``(changed, fractions)`` ``(T+1,)`` of a curve over ``units`` ranked units:
        ``changed[k] = min(k · step, units)``, ``fractions = changed / units``."""
        step = self.steps_of(units)
        count = math.ceil(units / step)
        changed = (torch.arange(count + 1, device=device) * step).clamp(max=units)
        return changed, changed.to(dtype) / units

    def schedule(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What changes when, for maps ``(N, 1, *S)``: ``(ranks, changed, fractions)``.

        ``ranks`` ``(N, P)``: each position's place in the order of change (0 first);
        ``changed`` ``(T+1,)``: at step ``k`` the positions with ``rank < changed[k]`` are
        changed; ``fractions`` ``(T+1,)``: the curve's x axis, 0 to 1. Here positions are
        ranked one by one (:func:`rank_positions`), ``changed = min(k · step, P)`` and
        ``fractions = changed / P``.
        """
        changed, fractions = self.changes(maps[0].numel(), maps.device, maps.dtype)
        order = rank_positions(maps, descending=True, seed=self.seed)
        return inverse_permutation(order), changed, fractions

    def __call__(self, inputs: Tensor, maps: Any, target: Target = None) -> CurveResult:
        """Run the curve on ``inputs`` ``(N, C, *S)`` ranked by ``maps``.

        Raises:
            TypeError / ValueError: for invalid inputs, maps or target.
        """
        x, m = prepare(inputs, maps)
        n = x.shape[0]
        ranks, changed, fractions = self.schedule(m)
        steps = changed.shape[0]
        with metric_context(self.model):
            scorer, _ = make_scorer(
                self.model, x, target, output_key=self.output_key, batch_size=self.batch_size
            )
            before, after = self._ends(x, self.substrate_of(x))
            sample = torch.arange(n, device=x.device).repeat_interleave(steps)
            k = torch.arange(steps, device=x.device).repeat(n)
            scores = []
            for s in range(0, sample.shape[0], self.batch_size):
                i, j = sample[s : s + self.batch_size], k[s : s + self.batch_size]
                mask = (ranks[i] < changed[j, None]).view(i.shape[0], 1, *x.shape[2:])
                scores.append(scorer(torch.where(mask, after[i], before[i]), i))
            curves = torch.cat(scores).view(n, steps).float()
        fractions = fractions.to(curves.dtype)
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
        substrate: what removed positions become: ``"zero"`` (default, as the RISE code; the
            mean of the normalised data), ``"blur"`` (:func:`gaussian_blur`), ``"rise_gkern"``
            (:func:`rise_blur`), ``"mean"`` (the image's channel means), a number or a tensor
            broadcastable to the inputs.
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

    Args: as :class:`Deletion`, but ``substrate`` is the start image (default ``"blur"``: a
    Gaussian truncated to 11 taps, σ = 5; ``"rise_gkern"`` is the RISE code's blur).
    """

    name = "insertion"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {"insertion_auc": True}
    titles: ClassVar[dict[str, str]] = {"insertion_auc": "Insertion AUC"}
    default_substrate = "blur"

    def _ends(self, x: Tensor, substrate: Tensor) -> tuple[Tensor, Tensor]:
        return substrate, x
