"""FGVis' defence against adversarial evidence: per-call bounds and the gradient gate.

After every elementwise nonlinearity *call* ``h`` of the model (module or functional; a module
reused ``k`` times in one forward pass gets ``k`` sets of bounds) an identity is inserted whose
backward pass lets the gradient through only where ``min(0, h(x)) ≤ h(e) ≤ max(0, h(x))`` —
bounds from one clean, detached forward pass of ``x``, inclusive comparisons (Wagner et al.,
Eq. 4). A nonlinearity whose output *is* the model's output is not filtered. The forward pass is
never altered, so every score is the real model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from evidencemap.capture import GradientGate, NonlinearityInterceptor

__all__ = ["DefenceRule", "NonlinearityBounds", "record_bounds"]

# Nonlinearities whose output is never negative: the lower bound min(0, h(x)) = 0 always holds.
_NON_NEGATIVE = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softplus"})


@dataclass
class NonlinearityBounds:
    """The bounds of one nonlinearity call, from the clean forward pass of ``x``.

    Attributes:
        name: the nonlinearity (``"relu6"``, ``"gelu"``, …).
        lower: ``min(0, h(x))`` (``None`` for non-negative nonlinearities, where it is 0).
        upper: ``max(0, h(x))``; both ``(N, *h.shape[1:])``, detached.
    """

    name: str
    lower: Tensor | None
    upper: Tensor

    def select(self, rows: Tensor | None) -> NonlinearityBounds:
        """The bounds of the samples ``rows`` (all when ``None``)."""
        if rows is None:
            return self
        lower = None if self.lower is None else self.lower[rows]
        return NonlinearityBounds(self.name, lower, self.upper[rows])

    def rule(self, h: Tensor, grad: Tensor) -> Tensor:
        """``grad · 1[lower ≤ h ≤ upper]`` (the FGVis backward rule, inclusive).

        The indicator is written as a float tensor that then takes the product in place: one
        fresh activation-sized tensor instead of a boolean one plus the product, which halves
        the rule's time on a CPU (where fresh large tensors cost page faults) and avoids the
        slow mixed bool × float product.
        """
        factor = torch.le(h, self.upper, out=torch.empty_like(grad))
        if self.lower is not None:
            factor.mul_(torch.ge(h, self.lower, out=torch.empty_like(grad)))
        return factor.mul_(grad)


def record_bounds(
    forward: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[Tensor, list[NonlinearityBounds | None]]:
    """One clean forward pass of ``x`` recording the bounds of every nonlinearity call.

    Returns ``(output, bounds)`` with one entry per call in execution order; the entry is
    ``None`` for a call whose output is the model's output itself (never filtered).
    """
    seen: list[tuple[str, Tensor]] = []

    def observe(_index: int, name: str, h: Tensor) -> Tensor:
        seen.append((name, h))
        return h

    with torch.no_grad(), NonlinearityInterceptor(observe):
        output = forward(x)
    bounds: list[NonlinearityBounds | None] = []
    for name, h in seen:
        if h is output:
            bounds.append(None)
            continue
        h = h.detach()
        lower = None if name in _NON_NEGATIVE else h.clamp(max=0)
        bounds.append(NonlinearityBounds(name, lower, h.clamp(min=0)))
    return output, bounds


class DefenceRule:
    """The interceptor rule of the optimisation passes: gate every call with its bounds.

    ``with NonlinearityInterceptor(DefenceRule(bounds)): model(e)`` runs the unchanged forward
    pass; call ``k``'s output ``h`` passes through :class:`~evidencemap.capture.GradientGate`
    with ``bounds[k].rule``, so its gradient is ``γ · 1[min(0, h(x)) ≤ h(e) ≤ max(0, h(x))]``.

    Raises:
        RuntimeError: when the pass makes other nonlinearity calls than the clean pass did.
    """

    def __init__(self, bounds: list[NonlinearityBounds | None]) -> None:
        self.bounds = bounds

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        if index >= len(self.bounds):
            raise RuntimeError(
                f"the model made more nonlinearity calls ({index + 1}) than in the clean forward "
                f"pass ({len(self.bounds)}); FGVis' defence needs the same calls for x and e"
            )
        bound = self.bounds[index]
        if bound is None:
            return h
        if bound.name != name or bound.upper.shape != h.shape:
            raise RuntimeError(
                f"nonlinearity call {index} is {name}{tuple(h.shape)} but was "
                f"{bound.name}{tuple(bound.upper.shape)} in the clean forward pass; FGVis' "
                "defence needs the same calls for x and e"
            )
        return GradientGate.apply(h, bound.rule)
