"""Deconvnet (Zeiler & Fergus 2014) through the per-call nonlinearity interceptor.

The backward pass of every rectifier-type nonlinearity call (``h = f(u)``) is replaced by a
ReLU of the arriving gradient, whatever the forward input was: ``R^l = max(R^{l+1}, 0)``
(guided backprop also gates by ``1[h > 0]``; the plain gradient gates by ``f'(u)`` only).
Linear layers, pooling and batch norm keep their ordinary (transposed) backward. For ReLU this
is Zeiler & Fergus' "unpooling + rectification + transposed filters" up to the max-pool switches,
which the ordinary max-pool gradient already routes, and exactly Captum's ``Deconvolution``;
for ReLU6, SiLU, GELU, … the same ``max(R, 0)`` replaces their derivative (Captum hooks only
``nn.ReLU`` modules and gives the plain gradient through the others).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from evidencemap.methods.base import Attribution
from evidencemap.methods.gradients import GUIDED_NONLINEARITIES, NonlinearityRuleMethod
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register
from evidencemap.methods.rules import ReplaceGradient, replaced
from evidencemap.targets import Target

__all__ = ["Deconvnet", "deconvnet_rule"]

NONLINEARITIES = Option(
    "nonlinearities",
    "any",
    GUIDED_NONLINEARITIES,
    "nonlinearities whose backward becomes max(R, 0)",
    other="a list of nonlinearity names",
)


def _deconv_backward(grad: Tensor) -> tuple[Tensor, None]:
    return grad.clamp(min=0), None


def deconvnet_rule(_name: str, u: Tensor, h: Tensor) -> Tensor:
    """``h`` whose backward sends ``max(R, 0)`` to the input ``u`` (the derivative ignored)."""
    if not (u.requires_grad or h.requires_grad):
        return h
    return ReplaceGradient.apply(u, h, _deconv_backward)


@register
class Deconvnet(NonlinearityRuleMethod):
    """Deconvnet (Zeiler & Fergus 2014; Captum's ``Deconvolution``): ``raw = R`` ``(N, C, *S)``.

    ``R`` is the gradient of ``y`` to the input with every rectifier's backward replaced by
    ``R^l = max(R^{l+1}, 0)`` (module docstring); ``map = max_c |R_c|`` as guided backprop.
    One forward and backward pass.

    Args:
        nonlinearities: names of the nonlinearities whose backward is replaced (default
            :data:`~evidencemap.methods.gradients.GUIDED_NONLINEARITIES`).
    """

    name = "deconvnet"
    aliases: ClassVar[tuple[str, ...]] = ("deconvolution", "deconv")
    OPTIONS: ClassVar[tuple[Option, ...]] = (NONLINEARITIES,)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        return self.input_gradients(x, target, replaced(deconvnet_rule, self.nonlinearities))
