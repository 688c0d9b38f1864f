"""FGVis' defence against adversarial evidence: per-call bounds and the gradient gate.

After every elementwise nonlinearity *call* ``h`` of the model (module or functional; a module
reused ``k`` times in one forward pass gets ``k`` sets of bounds) an identity is inserted whose
backward pass lets the gradient through only where ``min(0, h(x)) ≤ h(e) ≤ max(0, h(x))`` —
bounds from one clean, detached forward pass of ``x``, inclusive comparisons (Wagner et al.,
Eq. 4). A nonlinearity whose output *is* the model's output is not filtered. The forward pass is
never altered, so every score is the real model's.

ReLU and ReLU6 calls (the networks built in, and most CNNs) take a fused path: one autograd node
replaces "nonlinearity, then gate". Its forward computes ``h = act(z)`` with the same kernel as
the model's call and, while ``h`` is still in cache, the one-byte mask
``keep = [0 < h ≤ u']`` with ``u' = min(u, 6⁻)`` for ReLU6 (``6⁻`` the float just below 6;
``u' = u`` for ReLU); its backward is the one product ``γ · keep``. That is exactly the gated
gradient of the reference path ``act'(z) · 1[0 ≤ h ≤ u] · γ``: ``act'(z) ≠ 0`` iff ``0 < z``
(and ``z < 6``), where ``h = z``; so ``[0 < h < 6] · [h ≤ u] = [0 < h ≤ u']``. It saves one
byte per unit instead of the activation, and runs no Python rule in the backward pass. Other
nonlinearities keep the general path (:class:`~evidencemap.capture.GradientGate` with
:meth:`NonlinearityBounds.rule`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from evidencemap.capture import GradientGate, NonlinearityInterceptor

__all__ = ["DefenceRule", "NonlinearityBounds", "record_bounds"]

# Nonlinearities whose output is never negative: the lower bound min(0, h(x)) = 0 always holds.
_NON_NEGATIVE = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softplus"})
# Nonlinearities gated on the fused path: act(z) = clamp(z, 0, high), act'(z) = [0 < z < high].
_FUSED_HIGH: dict[str, float | None] = {"relu": None, "relu6": 6.0}


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
    _keep_limit: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def keep_limit(self) -> Tensor:
        """``u'`` of the fused path (module docstring): ``upper`` for ReLU, ``min(upper, 6⁻)``
        for ReLU6 (``6⁻`` the largest float below 6, in ``upper``'s dtype); computed once."""
        if self._keep_limit is None:
            high = _FUSED_HIGH[self.name]
            if high is None:
                self._keep_limit = self.upper
            else:
                top = torch.tensor(high, dtype=self.upper.dtype, device=self.upper.device)
                below = torch.nextafter(top, torch.zeros_like(top))
                self._keep_limit = torch.minimum(self.upper, below)
        return self._keep_limit

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


class _GatedClamp(torch.autograd.Function):
    """ReLU / ReLU6 and its defence gate as one node (module docstring).

    ``forward(z, u', high) = clamp(z, 0, high)`` (``torch.relu`` / ``F.hardtanh(z, 0, 6)``, the
    model's own kernels); ``backward(γ) = γ · [0 < h ≤ u']``, the mask kept as one byte per
    unit from the forward pass. Shapes: ``z``, ``u'`` and the output ``(N, *S)``.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, limit: Tensor, high: float | None) -> Tensor:
        h = torch.relu(z) if high is None else F.hardtanh(z, 0.0, high)
        # Two comparisons written as bool (1 byte per unit); h ≥ 0, so h.bool() is [h > 0].
        keep = torch.le(h, limit).logical_and_(h.bool())
        ctx.save_for_backward(keep)
        return h

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        # The byte view makes the product one vectorised float × uint8 pass (a bool operand
        # takes a slower path; torch.where is slower still on CPU).
        return grad * keep.view(torch.uint8), None, None


class DefenceRule:
    """The interceptor rule of the optimisation passes: gate every call with its bounds.

    ``with NonlinearityInterceptor(DefenceRule(bounds)): model(e)`` runs the unchanged forward
    pass; call ``k``'s output ``h`` gets the gradient ``γ · 1[min(0, h(x)) ≤ h(e) ≤ max(0,
    h(x))]``: ReLU and ReLU6 calls through :meth:`replace` (the fused node, module docstring),
    every other nonlinearity through :class:`~evidencemap.capture.GradientGate` with
    ``bounds[k].rule`` (:meth:`__call__`). Both give the same gradient, exactly. A subclass
    that overrides :meth:`__call__` (to observe every output) gets every call there.

    Raises:
        RuntimeError: when the pass makes other nonlinearity calls than the clean pass did.
    """

    def __init__(self, bounds: list[NonlinearityBounds | None]) -> None:
        self.bounds = bounds
        self._fused = type(self).__call__ is DefenceRule.__call__

    def _bound(self, index: int, name: str, shape: torch.Size) -> NonlinearityBounds | None:
        """Call ``index``'s bounds (``None``: not gated), checked against the clean pass."""
        if index >= len(self.bounds):
            raise RuntimeError(
                f"the model made more nonlinearity calls ({index + 1}) than in the clean forward "
                f"pass ({len(self.bounds)}); FGVis' defence needs the same calls for x and e"
            )
        bound = self.bounds[index]
        if bound is not None and (bound.name != name or bound.upper.shape != shape):
            raise RuntimeError(
                f"nonlinearity call {index} is {name}{tuple(shape)} but was "
                f"{bound.name}{tuple(bound.upper.shape)} in the clean forward pass; FGVis' "
                "defence needs the same calls for x and e"
            )
        return bound

    def replace(self, index: int, name: str, z: Tensor) -> Tensor | None:
        """The fused ReLU / ReLU6 node on input ``z`` for call ``index``; ``None`` (the call
        runs as usual, then :meth:`__call__`) for other nonlinearities, ungated calls, inputs
        without gradient, and subclasses that override :meth:`__call__`."""
        if not self._fused or name not in _FUSED_HIGH:
            return None
        if not (z.requires_grad and torch.is_grad_enabled()):
            return None
        bound = self._bound(index, name, z.shape)
        if bound is None:
            return None
        output: Tensor = _GatedClamp.apply(z, bound.keep_limit(), _FUSED_HIGH[name])
        return output

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        bound = self._bound(index, name, h.shape)
        if bound is None:
            return h
        return GradientGate.apply(h, bound.rule)
