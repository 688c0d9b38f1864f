"""DeepLIFT with the rescale rule (Shrikumar et al. 2017), through the nonlinearity interceptor.

The inputs ``x`` and their reference ``r`` run through the model as one batch ``[x; r]``
``(2N, C, *S)``. At every call ``h = f(u)`` of an elementwise nonlinearity the backward
multiplier becomes the secant ``m = Δh/Δu = (f(u_x) − f(u_r))/(u_x − u_r)`` instead of the
derivative ``f'(u_x)`` (where ``|Δu| < eps`` the derivative is kept, as Captum does). Linear
layers (convolutions, batch norm in eval mode, average pooling, the classifier) keep their
gradient, which is their exact multiplier. The chain rule of multipliers then gives

    ``DL(x) = (x − r) ⊙ ∂̃y/∂x``,  ``Σ DL = F(x) − F(r)`` (completeness, summation-to-delta)

*exactly* on networks built from linear maps and elementwise nonlinearities (ReLU, ReLU6,
leaky ReLU, SiLU, …: any of them, since the secant of any ``f`` telescopes). Products of two
activations (squeeze-excitation gates, attention) and max-pooling keep their ordinary gradient,
so completeness is approximate there; ``extras["completeness_gap"]`` reports it.

Because it works per nonlinearity *call* (modules, functional calls, in-place forms alike),
models with ``F.relu`` or ``torch.relu`` in ``forward`` are handled too; Captum's ``DeepLift``
hooks ``nn.Module`` instances of the activations it lists and silently uses the plain gradient
for functional calls (and refuses a module reused twice).

On EfficientNet-Lite0 (``nn.ReLU6`` everywhere, no squeeze-excitation): the rescale rule on
ReLU6 is ``m = (clip(u_x, 0, 6) − clip(u_r, 0, 6))/(u_x − u_r)``, which is 1 where both are in
``[0, 6]``, 0 where both are saturated on one side and a fraction where the two straddle a kink;
the network is linear + elementwise, so completeness holds up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.maps import FLAT_EPS
from evidencemap.methods.attribution import SIGN, signed_sum
from evidencemap.methods.base import Attribution, InputMethod
from evidencemap.methods.gradients import _check_nonlinearities
from evidencemap.methods.options import BLUR_SIGMA, Option
from evidencemap.methods.registry import register
from evidencemap.methods.rules import InputRule, ReplaceGradient, nonlinearity_names, replaced
from evidencemap.references import REFERENCES, check_reference, reference_image
from evidencemap.targets import Target, resolve

__all__ = ["DEEPLIFT_EPS", "DeepLift", "rescale_rule"]

DEEPLIFT_EPS = 1e-10
"""``|Δu|`` below which the derivative is kept instead of the secant (Captum's ``eps``)."""


def rescale_rule(eps: float = DEEPLIFT_EPS) -> InputRule:
    """The rescale rule for a batch ``[x; r]``: a ``rule(name, u, h)`` for
    :func:`~evidencemap.methods.rules.replaced`. Calls whose batch is odd pass unchanged."""

    def rule(_name: str, u: Tensor, h: Tensor) -> Tensor:
        if u.shape[0] % 2 or not (u.requires_grad or h.requires_grad):
            return h
        with torch.no_grad():
            ux, ur = u.detach().chunk(2)
            hx, hr = h.detach().chunk(2)
            du = ux - ur
            near = du.abs() < eps
            m = (hx - hr).div_(du.masked_fill_(near, 1.0)).masked_fill_(near, 0.0)
            keep = near if bool(near.any()) else None
        # kept for the backward: m (N, …) and the near mask (bool, only when some unit has
        # u_x = u_r), both applied to each half of [x; r] by broadcasting: ∂/∂u = g·m, and
        # g·1[near] on through f'(u) (skipped, with f's own backward, when no unit is near)

        def backward(grad: Tensor) -> tuple[Tensor, Tensor | None]:
            halves = grad.unflatten(0, (2, -1))
            to_h = None if keep is None else (halves * keep).flatten(0, 1)
            return (halves * m).flatten(0, 1), to_h

        return ReplaceGradient.apply(u, h, backward)

    return rule


NONLINEARITIES = Option(
    "nonlinearities",
    "any",
    nonlinearity_names(),
    "nonlinearities whose multiplier is the secant Δh/Δu",
    other="a list of nonlinearity names",
)


@register
class DeepLift(InputMethod):
    """DeepLIFT, rescale rule (module docstring): ``raw = (x − r) ⊙ ∂̃y/∂x`` ``(N, C, *S)``.

    One forward and backward pass of ``2N`` inputs (``x`` and the reference). ``map =
    ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``. ``extras``: ``completeness_gap = Σ raw − (F(x) −
    F(r))`` per sample, ``completeness_relative = |gap| / |F(x) − F(r)|`` and
    ``baseline_score = F(r)``.

    Args:
        baseline: the reference ``r``: ``"zero"`` (default), ``"blur"``, ``"mean"``, a number
            or a tensor ``(N | 1, C, *S)`` / ``(C, *S)`` (:mod:`evidencemap.references`).
        blur_sigma: σ in pixels of the ``"blur"`` reference.
        nonlinearities: names that get the rescale rule (default: every elementwise
            nonlinearity the interceptor recognises).
        sign: the map's reduction.
    """

    name = "deeplift"
    aliases: ClassVar[tuple[str, ...]] = ("deep_lift", "deep-lift")
    passes_per_call: ClassVar[float] = 2.0
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "baseline",
            "str",
            "zero",
            "the reference r (evidencemap.references)",
            choices=REFERENCES,
            other="a number or a tensor (N | 1, C, *S) / (C, *S)",
        ),
        BLUR_SIGMA,
        NONLINEARITIES,
        SIGN,
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: Tensor | str | float = "zero",
        blur_sigma: float = 10.0,
        nonlinearities: Collection[str] = NONLINEARITIES.default,
        sign: str = "positive",
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.baseline = check_reference(self.option("baseline", baseline), "baseline")
        self.blur_sigma = self.option("blur_sigma", blur_sigma)
        self.nonlinearities = _check_nonlinearities(nonlinearities)
        self.sign = self.option("sign", sign)

    def input_bytes(self, x: Tensor) -> int:
        """Twice a saliency pass: the input and its reference run as one batch."""
        return 2 * super().input_bytes(x)

    def reduce(self, raw: Tensor) -> Tensor:
        return signed_sum(raw, self.sign)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        n = x.shape[0]
        ref = reference_image(x, self.baseline, blur_sigma=self.blur_sigma, name="baseline")
        both = torch.cat([x, ref]).detach().requires_grad_(True)
        with torch.enable_grad():
            with replaced(rescale_rule(), self.nonlinearities):
                output = self.forward(both)
            resolved = resolve(target, output[:n])
            scores = resolved.score(output[:n])
            (grads,) = torch.autograd.grad(scores.sum(), both)
        with torch.no_grad():
            base_scores = resolved.score(output[n:])
        raw = (x - ref) * grads[:n]
        delta = scores.detach() - base_scores
        gap = raw.flatten(1).sum(1) - delta
        extras = {
            "completeness_gap": gap,
            "completeness_relative": gap.abs() / delta.abs().clamp(min=FLAT_EPS),
            "baseline_score": base_scores,
        }
        return Attribution(raw, output[:n].detach(), resolved, scores.detach(), extras)
