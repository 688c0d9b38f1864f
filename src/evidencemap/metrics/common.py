"""What every metric shares: argument checks, the score it reads, pixel ranking, forwards.

Conventions of :mod:`evidencemap.metrics`:

* inputs are normalised model inputs ``(N, C, *S)`` (2-D images or 3-D volumes);
* maps are ``(N, 1, *S)`` or ``(N, *S)`` (an :class:`~evidencemap.Explanation` is accepted for
  its ``maps``); maps of another spatial size are resized to ``S`` (bilinear / trilinear);
* a target is ``None`` (the top-1 class on the unperturbed input), an int, ``N`` class indices,
  or a callable from the model output to one score per row. With a class target the score is
  the **softmax probability** of that class (RISE, Grad-CAM++, ADCC); a callable is used as is
  and must score each row of any batch on its own (e.g. ``targets.ClassProbability(3)``);
* every metric class states its direction: ``higher_is_better`` for its main value and
  ``directions`` (value name → higher is better) for everything it reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evidencemap.capture import eval_mode
from evidencemap.checks import check_inputs, check_model, check_positive_int
from evidencemap.explanation import Explanation
from evidencemap.maps import upsample
from evidencemap.methods.options import Option
from evidencemap.metrics.base import Explainer, Metric
from evidencemap.targets import (
    ClassLogit,
    ClassProbability,
    OutputKey,
    Target,
    resolve,
    select_output,
)

__all__ = [
    "BATCH_SIZE",
    "SEED",
    "Explainer",
    "Metric",
    "Scorer",
    "check_explainer",
    "check_maps",
    "check_nonneg_float",
    "check_unit_maps",
    "check_volumes",
    "make_scorer",
    "metric_context",
    "prepare",
    "rank_positions",
    "run_explainer",
]

# Tolerance on the [0, 1] range of maps that multiply images.
_UNIT_TOL = 1e-6


BATCH_SIZE = Option(
    "batch_size", "int", 64, "perturbed inputs per forward pass", low=1, cost="chunk"
)
"""The shared ``batch_size`` option of the metrics that run the model."""

SEED = Option("seed", "int", 0, "seed of every random choice")
"""The shared ``seed`` option."""


def check_maps(maps: Any, inputs: Tensor, name: str = "maps") -> Tensor:
    """``maps`` as ``(N, 1, *S)`` float on the inputs' device, ``S`` the inputs' spatial size.

    Args:
        maps: a tensor ``(N, 1, *S')`` or ``(N, *S')`` (bool or float), or an Explanation.
        inputs: the ``(N, C, *S)`` inputs the maps explain.
        name: the argument's name for error messages.

    Raises:
        TypeError: when ``maps`` is neither a tensor nor an Explanation.
        ValueError: for another batch size or rank, or non-finite values.
    """
    if isinstance(maps, Explanation):
        maps = maps.maps
    if not isinstance(maps, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or an Explanation, got {type(maps).__name__}"
        )
    n, spatial = inputs.shape[0], tuple(inputs.shape[2:])
    if maps.ndim == len(spatial) + 1:
        maps = maps.unsqueeze(1)
    if maps.ndim != len(spatial) + 2 or maps.shape[1] != 1:
        raise ValueError(
            f"{name} must be (N, 1, *S) or (N, *S) with {len(spatial)} spatial axes like the "
            f"inputs {tuple(inputs.shape)}, got {tuple(maps.shape)}"
        )
    if maps.shape[0] != n:
        raise ValueError(f"{name} has {maps.shape[0]} maps but the inputs have {n} samples")
    if maps.dtype == torch.bool or not maps.is_floating_point():
        maps = maps.float()
    maps = maps.detach().to(inputs.device, inputs.dtype)
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return upsample(maps, spatial)


def check_unit_maps(maps: Tensor, name: str = "maps") -> Tensor:
    """``maps`` if every value lies in [0, 1] (maps that multiply an image must).

    Raises:
        ValueError: otherwise (the message suggests ``evidencemap.maps.normalize``).
    """
    if bool((maps < -_UNIT_TOL).any()) or bool((maps > 1 + _UNIT_TOL).any()):
        raise ValueError(
            f"{name} must lie in [0, 1] for this metric (got values in "
            f"[{float(maps.min()):.4g}, {float(maps.max()):.4g}]); normalise them first, e.g. "
            "with evidencemap.maps.normalize"
        )
    return maps.clamp(0, 1)


def check_explainer(explainer: Any) -> Explainer:
    """``explainer`` if it is callable.

    Raises:
        TypeError: otherwise.
    """
    if not callable(explainer):
        raise TypeError(
            "explainer must be a callable explainer(inputs, target) -> maps or Explanation "
            f"(e.g. evidencemap.GradCAM(model)), got {type(explainer).__name__}"
        )
    return explainer


def run_explainer(explainer: Explainer, inputs: Tensor, target: Any) -> Tensor:
    """The ``(N, 1, *S)`` maps of ``explainer`` on ``inputs`` for ``target``."""
    result = explainer(inputs, target)
    return check_maps(result, inputs, name="the explainer's maps")


@dataclass
class Scorer:
    """The score a metric reads from the model, for rows that belong to given samples.

    Attributes:
        model: the model.
        output_key: which output tensor to read (see :func:`~evidencemap.targets.select_output`).
        classes: ``(N,)`` class indices of the samples, or ``None`` for a callable target.
        kind: ``"probability"`` (softmax of ``classes``), ``"logit"`` or ``"callable"``.
        fn: the callable target (``kind == "callable"``).
        batch_size: rows per forward pass.
    """

    model: nn.Module
    output_key: OutputKey
    classes: Tensor | None
    kind: str
    fn: Callable[[Tensor], Tensor] | None
    batch_size: int

    def output(self, x: Tensor) -> Tensor:
        """The selected model output on ``x``."""
        return select_output(self.model(x), self.output_key)

    def score_output(self, output: Tensor, index: Tensor) -> Tensor:
        """Scores ``(m,)`` of an output ``(m, …)`` whose rows belong to samples ``index``."""
        if self.kind == "callable":
            if self.fn is None:  # pragma: no cover - constructed by make_scorer
                raise RuntimeError("a callable scorer without a function")
            value = self.fn(output)
            if not isinstance(value, Tensor) or value.shape != (output.shape[0],):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"the target must give one score per row, shape ({output.shape[0]},); got "
                    f"{shape} (a callable target must work on batches of any size)"
                )
            return value
        if self.classes is None:  # pragma: no cover - constructed by make_scorer
            raise RuntimeError("a class scorer without classes")
        values = output.softmax(dim=1) if self.kind == "probability" else output
        picked = values[torch.arange(values.shape[0], device=values.device), self.classes[index]]
        return picked.flatten(1).sum(1) if picked.ndim > 1 else picked

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        """Scores ``(m,)`` of rows ``x`` ``(m, C, *S)`` that belong to samples ``index``."""
        parts = [
            self.score_output(
                self.output(x[s : s + self.batch_size]), index[s : s + self.batch_size]
            )
            for s in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(parts)

    def target(self) -> Target:
        """The target to hand an explainer: the class indices, or the callable."""
        return self.classes if self.classes is not None else self.fn


def make_scorer(
    model: Any,
    inputs: Tensor,
    target: Target,
    *,
    output_key: OutputKey = None,
    batch_size: int = 64,
) -> tuple[Scorer, Tensor]:
    """Resolve ``target`` on ``inputs`` and return ``(scorer, scores of the inputs (N,))``.

    Must run with the model in eval mode and autograd off (the metrics do both).
    """
    model = check_model(model)
    batch_size = check_positive_int(batch_size, "batch_size")
    n = inputs.shape[0]
    index = torch.arange(n, device=inputs.device)
    outputs = [
        select_output(model(inputs[s : s + batch_size]), output_key)
        for s in range(0, n, batch_size)
    ]
    output = torch.cat(outputs)
    kind, fn = "probability", None
    if isinstance(target, ClassLogit):
        kind = "logit"
    if isinstance(target, (ClassLogit, ClassProbability)):
        target = target.classes
    if callable(target) and not isinstance(target, Tensor):
        scorer = Scorer(model, output_key, None, "callable", target, batch_size)
        return scorer, scorer.score_output(output, index)
    classes = resolve(target, output).classes
    scorer = Scorer(model, output_key, classes, kind, fn, batch_size)
    return scorer, scorer.score_output(output, index)


def rank_positions(maps: Tensor, *, descending: bool = True, seed: int = 0) -> Tensor:
    """Spatial positions of each map ordered by value: ``(N, 1, *S)`` → ``(N, P)`` indices.

    ``P = prod(S)``; all channels of a position move together. Ties are broken in a random
    order drawn from ``seed`` (not in raster order, which would favour the top rows of flat
    regions such as the zeros of a ReLU-ed CAM).
    """
    flat = maps.flatten(1)
    gen = torch.Generator(device=flat.device).manual_seed(seed)
    perm = torch.randperm(flat.shape[1], generator=gen, device=flat.device)
    order = flat[:, perm].argsort(dim=1, descending=descending, stable=True)
    return perm[order]


@contextmanager
def metric_context(model: nn.Module) -> Iterator[None]:
    """Eval mode (every flag restored afterwards) and ``torch.no_grad`` for forwards."""
    with eval_mode(model), torch.no_grad():
        yield


def check_nonneg_float(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float ≥ 0 (> 0 with ``positive``).

    Raises:
        TypeError / ValueError: otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )
    return value


def check_volumes(metric: type[Metric] | Metric, inputs: Tensor) -> None:
    """Raise when ``metric`` is not defined for the rank of ``inputs``.

    Raises:
        ValueError: for 3-D volumes and a metric without ``supports_volumes``.
    """
    if inputs.ndim == 5 and not metric.supports_volumes:
        raise ValueError(f"the {metric.name} metric is defined for 2-D images only, got volumes")


def prepare(inputs: Any, maps: Any) -> tuple[Tensor, Tensor]:
    """Validated ``inputs`` (detached) and ``maps`` at their resolution ``(N, 1, *S)``."""
    x = check_inputs(inputs).detach()
    return x, check_maps(maps, x)
