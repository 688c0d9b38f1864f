"""Gradient × input attributions: Input × Gradient and GradientSHAP.

Notation as in :mod:`evidencemap.methods.gradients`: ``x ∈ R^{N×C×S}`` the inputs, ``y = F(x)``
the target score of each sample. Both methods return ``raw`` = signed per-channel attributions
``(N, C, *S)`` and a map ``(N, 1, *S)`` of their channel sum, ``ReLU(Σ_c raw_c)``
(``sign="positive"``, evidence for the target, as Integrated Gradients) or ``|Σ_c raw_c|``
(``sign="absolute"``), min-max normalised per sample.

==================  ==================================================  ======================
method              ``raw``                                             ``maps``
==================  ==================================================  ======================
input_x_gradient    ``x ⊙ ∂y/∂x``                                       ``sign(Σ_c raw_c)``
gradient_shap       ``E_{b,ε,α}[(x̃ − b) ⊙ ∂F(b + α(x̃ − b))/∂x]``       ``sign(Σ_c raw_c)``
==================  ==================================================  ======================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.methods.base import Attribution, InputMethod
from evidencemap.methods.gradients import IG_SIGNS, _slice_scores, copy_bytes
from evidencemap.methods.options import BLUR_SIGMA, MEMORY_BUDGET, Option, batch_option
from evidencemap.methods.registry import register
from evidencemap.references import REFERENCES, check_reference, reference_image
from evidencemap.targets import Target, resolve

__all__ = ["SIGN", "GradientShap", "InputXGradient", "gradient_shap_draws", "signed_sum"]

SIGN = Option("sign", "str", "positive", "map of ReLU(Σ_c raw_c) or |Σ_c raw_c|", choices=IG_SIGNS)
"""The ``sign`` option of the signed attribution methods (their map's channel reduction)."""


def signed_sum(raw: Tensor, sign: str) -> Tensor:
    """``ReLU(Σ_c raw_c)`` (``"positive"``) or ``|Σ_c raw_c|`` (``"absolute"``): ``(N, 1, *S)``."""
    total = raw.sum(dim=1, keepdim=True)
    return total.clamp(min=0) if sign == "positive" else total.abs()


@register
class InputXGradient(InputMethod):
    """Input × Gradient (Shrikumar et al. 2016): ``raw = x ⊙ ∂y/∂x`` ``(N, C, *S)``.

    One forward and backward pass. On a network that is piecewise linear and has no biases
    (ReLU, no batch norm offsets) ``Σ raw = F(x)`` (Euler's theorem); in general it is the
    first-order Taylor term of ``F`` around 0. ``map = ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``.

    Args:
        sign: ``"positive"`` (default) or ``"absolute"``, the map's reduction (see the module
            docstring).
    """

    name = "input_x_gradient"
    aliases: ClassVar[tuple[str, ...]] = ("inputxgradient", "input-x-gradient", "gradient_x_input")
    OPTIONS: ClassVar[tuple[Option, ...]] = (SIGN,)

    def __init__(self, model: nn.Module, *, sign: str = "positive", **kw: Any) -> None:
        super().__init__(model, **kw)
        self.sign = self.option("sign", sign)

    def reduce(self, raw: Tensor) -> Tensor:
        return signed_sum(raw, self.sign)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        got = self.input_gradients(x, target)
        got.raw = x * got.raw
        return got


def gradient_shap_draws(
    x: Tensor, samples: int, baselines: int, sigma: Tensor, seed: int | None, chunk: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """GradientSHAP's random draws, ``chunk`` copies at a time: ``(ε, index, α)``.

    Copy ``i`` draws, in this order from one CPU generator: a standard-normal ``z_i`` of one
    sample's shape ``(C, *S)``, a baseline index ``b_i`` uniform in ``[0, baselines)`` and a
    path point ``α_i`` uniform in ``[0, 1)``; every sample ``n`` of the batch uses them with
    its own noise level, ``ε_{i,n} = σ_n z_i``, so a sample gets the same draws alone as in any
    batch (a batch can be split without changing a map). Yields ``ε`` ``(k, N, C, *S)``,
    ``index`` ``(k,)`` (int64) and ``α`` ``(k,)`` on ``x``'s device.
    """
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    scale = sigma.view(1, -1, *([1] * (x.ndim - 1)))
    for start in range(0, samples, max(1, chunk)):
        k = min(max(1, chunk), samples - start)
        z, index, alpha = [], [], []
        for _ in range(k):
            z.append(torch.randn(x.shape[1:], generator=gen, dtype=x.dtype))
            index.append(torch.randint(baselines, (1,), generator=gen))
            alpha.append(torch.rand(1, generator=gen, dtype=x.dtype))
        eps = torch.stack(z).to(x.device).unsqueeze(1) * scale
        yield eps, torch.cat(index).to(x.device), torch.cat(alpha).to(x.device)


@register
class GradientShap(InputMethod):
    """GradientSHAP (Lundberg & Lee 2017; Captum's ``GradientShap``): expected gradients.

    ``raw = (1/n) Σ_i (x̃_i − b_i) ⊙ ∂F(b_i + α_i (x̃_i − b_i))/∂x`` ``(N, C, *S)``, with
    ``n`` copies ``i``, each drawing (:func:`gradient_shap_draws`) a baseline ``b_i`` uniformly
    from the baseline set, noise ``x̃_i = x + ε_i``, ``ε_i ~ N(0, σ²)`` with
    ``σ = sigma·(max x − min x)`` per sample, and ``α_i ~ U[0, 1)``. In expectation
    ``Σ raw ≈ F(x) − E_b[F(b)]`` (with ``sigma = 0``): a stochastic Integrated Gradients
    averaged over baselines. The copies of a whole batch run in chunks of
    ``internal_batch_size`` inputs (fewer under a memory budget), the draws made chunk by
    chunk. ``map = ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``.

    Args:
        baselines: the baseline set: ``"zero"``, ``"blur"``, ``"mean"`` (one baseline per
            sample, :mod:`evidencemap.references`), a number, or a tensor ``(B, C, *S)`` of
            ``B`` baselines shared by every sample (``(C, *S)``: one).
        samples: copies ``n`` (Captum's ``n_samples``).
        sigma: noise level as a fraction of each input's value range (Captum's ``stdevs``
            is the absolute ``σ``).
        seed: seed of the draws (``None``: torch's global generator).
        blur_sigma: σ in pixels of the ``"blur"`` baseline.
        internal_batch_size: inputs per forward/backward pass (whole copies of the batch).
        memory_budget: bytes one chunk may take (``None``: no limit of its own).
        sign: the map's reduction.

    Raises:
        TypeError / ValueError: for a bad baseline set, samples, sigma or sign.
    """

    name = "gradient_shap"
    aliases: ClassVar[tuple[str, ...]] = ("gradientshap", "gradient-shap", "expected_gradients")
    sizes_own_chunks: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "baselines",
            "str",
            "zero",
            "the baseline set the copies draw from (evidencemap.references)",
            choices=REFERENCES,
            other="a number or a tensor (B, C, *S) / (C, *S) of baselines",
        ),
        Option(
            "samples",
            "int",
            5,
            "copies (baseline, noise, path point)",
            low=1,
            cost="work",
            cap=200,
            passes=True,
        ),
        Option("sigma", "float", 0.0, "noise σ as a fraction of the input's range", low=0.0),
        Option("seed", "int", 0, "seed of the draws", nullable=True),
        BLUR_SIGMA,
        batch_option(32, "inputs per forward/backward pass"),
        MEMORY_BUDGET,
        SIGN,
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        baselines: Tensor | str | float = "zero",
        samples: int = 5,
        sigma: float = 0.0,
        seed: int | None = 0,
        blur_sigma: float = 10.0,
        internal_batch_size: int = 32,
        memory_budget: int | None = None,
        sign: str = "positive",
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.baselines = check_reference(self.option("baselines", baselines), "baselines")
        self.samples = self.option("samples", samples)
        self.sigma = self.option("sigma", sigma)
        self.seed = self.option("seed", seed)
        self.blur_sigma = self.option("blur_sigma", blur_sigma)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.sign = self.option("sign", sign)

    def reduce(self, raw: Tensor) -> Tensor:
        return signed_sum(raw, self.sign)

    def baseline_set(self, x: Tensor) -> Tensor:
        """The baselines ``(B, N | 1, C, *S)`` the copies of ``x`` ``(N, C, *S)`` draw from."""
        if isinstance(self.baselines, Tensor):
            b = self.baselines.to(device=x.device, dtype=x.dtype).detach()
            if b.ndim == x.ndim - 1:
                b = b.unsqueeze(0)
            if b.ndim != x.ndim or b.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"baselines must have shape (B, {', '.join(map(str, x.shape[1:]))}) or "
                    f"one sample's shape, got {tuple(self.baselines.shape)}"
                )
            return b.unsqueeze(1)
        ref = reference_image(x, self.baselines, blur_sigma=self.blur_sigma, name="baselines")
        return ref.unsqueeze(0)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        n = x.shape[0]
        with torch.no_grad():
            output = self.forward(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
        bases = self.baseline_set(x)
        span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
        score = _slice_scores(resolved, n)
        per_copy = copy_bytes(self, x, self.memory_budget)
        total = torch.zeros_like(x)
        shape = (-1, *([1] * x.ndim))
        draws = gradient_shap_draws(
            x, self.samples, bases.shape[0], self.sigma * span, self.seed, 1
        )

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, self.samples, "gradient_shap")
            parts = [next(draws) for _ in range(stop - start)]
            eps = torch.cat([p[0] for p in parts])
            index = torch.cat([p[1] for p in parts])
            alpha = torch.cat([p[2] for p in parts]).view(shape)
            diff = x.unsqueeze(0) + eps - bases[index]
            point = (bases[index] + alpha * diff).reshape(-1, *x.shape[1:]).requires_grad_(True)
            with torch.enable_grad():
                (grads,) = torch.autograd.grad(score(self.forward(point)).sum(), point)
            total.add_((diff * grads.view_as(diff)).sum(0))

        requested = max(1, self.internal_batch_size // n)
        runtime.run_chunked(self.samples, per_copy, requested, step, "copies", self.memory_budget)
        return Attribution(total / self.samples, output.detach(), resolved, scores.detach())
