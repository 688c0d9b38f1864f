"""Backward rules that replace a nonlinearity's whole derivative (Deconvnet, DeepLIFT).

:class:`~evidencemap.capture.GradientGate` filters the gradient arriving at a nonlinearity's
*output*; autograd then still applies the nonlinearity's own derivative. Deconvnet and
DeepLIFT replace that derivative: they need the call's *input* ``u`` as well as its output
``h``. :class:`InputInterceptor` is the same per-call interceptor
(:class:`~evidencemap.capture.NonlinearityInterceptor`: modules and functional calls alike,
nothing patched) whose rule also receives ``u``; :class:`ReplaceGradient` is the identity on
``h`` whose backward splits the arriving gradient ``g`` into a part sent to ``u`` directly and
a part sent on through the nonlinearity's own derivative. It saves no tensor of its own: what a
rule needs in the backward pass it keeps itself (DeepLIFT: the multipliers), so the memory of
the graph grows only by that.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from evidencemap.capture import NONLINEARITIES, NonlinearityInterceptor

__all__ = ["InputInterceptor", "InputRule", "ReplaceGradient", "nonlinearity_names", "replaced"]

InputRule = Callable[[str, Tensor, Tensor], Tensor]
"""``rule(name, u, h)`` → the tensor the forward pass continues with."""
GradRule = Callable[[Tensor], "tuple[Tensor | None, Tensor | None]"]
"""``backward(g)`` → (the gradient for ``u`` directly, the gradient kept for ``h``)."""


def nonlinearity_names() -> frozenset[str]:
    """Every nonlinearity name the interceptor recognises (``"relu"``, ``"sigmoid"``, …)."""
    return frozenset(n.rstrip("_") for n in NONLINEARITIES.values())


class ReplaceGradient(torch.autograd.Function):
    """``forward(u, h, backward) = h``; ``backward(g)`` = ``backward(g)`` for ``(u, h)``.

    The gradient returned for ``u`` reaches the nonlinearity's input directly; the one returned
    for ``h`` goes on through the nonlinearity's own derivative (``None``: nothing).
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, h: Tensor, backward: GradRule) -> Tensor:
        ctx.backward_rule = backward
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        to_u, to_h = ctx.backward_rule(grad)
        return to_u, to_h, None


class InputInterceptor(NonlinearityInterceptor):
    """A :class:`NonlinearityInterceptor` whose rule is ``rule(name, u, h)``.

    ``u`` is the call's input tensor (its first argument; in-place forms are run out of place
    by the parent class, so ``u`` keeps its values), ``h`` the output. Calls of nonlinearities
    not in ``names`` or whose input is not a tensor pass unchanged.
    """

    def __init__(self, rule: InputRule, names: Collection[str]) -> None:
        self.names = frozenset(names)
        self.input_rule = rule
        self._input: Tensor | None = None
        super().__init__(self._dispatch)

    def _dispatch(self, _index: int, name: str, output: Tensor) -> Tensor:
        u, self._input = self._input, None  # not kept: it holds the whole graph before it
        if name not in self.names or not isinstance(u, Tensor) or u.shape != output.shape:
            return output
        return self.input_rule(name, u, output)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in NONLINEARITIES:
            self._input = args[0] if args else (kwargs or {}).get("input")
        return super().__torch_function__(func, types, args, kwargs)


@contextmanager
def replaced(rule: InputRule, names: Collection[str]) -> Iterator[None]:
    """Inside the block, every call of a nonlinearity in ``names`` continues with
    ``rule(name, u, h)``; graphs built inside keep the rule after the block (backward outside)."""
    interceptor = InputInterceptor(rule, names)
    try:
        with interceptor:
            yield
    finally:
        # The interceptor refers to itself (its rule is its bound method), so only the cycle
        # collector frees it: it must not hold a tensor of the graph until then.
        interceptor._input = None
