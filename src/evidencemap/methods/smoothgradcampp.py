"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with gradients averaged over noisy inputs.

With ``A ∈ R^{N×K×s}`` the layer's activations on the clean inputs ``x`` and ``g_t = ∂y_c/∂A``
at the noisy inputs ``x + ε_t`` (``ε_t ~ N(0, σ²)``, ``t = 1 … T``), the means
``D¹ = (1/T) Σ_t g_t``, ``D² = (1/T) Σ_t g_t²``, ``D³ = (1/T) Σ_t g_t³`` give

``α_k,ij = D²_k,ij / (2 D²_k,ij + Σ_ab A_k,ab D³_k,ab)`` (``α = 0`` where the denominator is 0),
``w_k = Σ_ij α_k,ij ReLU(D¹_k,ij)``, ``L = ReLU(Σ_k w_k A_k)``.

The denominator's sum ``Σ_ab A_k,ab D³_k,ab`` is TorchCAM's (its ``SmoothGradCAMpp``); TorchCAM
weights by ``ReLU`` of the *last* noisy sample's gradient, where this uses their mean ``D¹`` (the
paper's first-order term): with one sample, or noise that tends to 0, the two agree. TorchCAM runs
one forward and backward pass per sample in a Python loop; here the ``T`` noisy copies of the
batch run as one batch (chunked by the memory budget), with the backward pass stopping at the layer.

The noise of sample ``t`` is drawn from a generator seeded ``noise_seed + t`` (default seed 0: a
call is repeatable; ``None``: one seed from torch's generator per call); it covers the whole
batch at once, so a memory budget does not split the batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.methods.ablationcam import group_scores
from evidencemap.methods.base import Context, LayerMethod, _forward_from_layer
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register

__all__ = ["SmoothGradCAMPlusPlus"]


@register
class SmoothGradCAMPlusPlus(LayerMethod):
    """Smooth Grad-CAM++: Grad-CAM++ weights from gradients averaged over ``samples`` noisy inputs.

    See the module docstring for the formula. Args: ``samples`` (T, default 4), ``noise``
    (σ, default 0.3, TorchCAM's), ``noise_seed`` (default 0).
    """

    name = "smoothgradcam++"
    token_layers = False  # its noisy passes rerun the network from the layer's raw output
    aliases = ("smoothgradcampp", "smooth-grad-cam++")
    passes_per_call: ClassVar[float] = 1.0
    sizes_own_chunks: ClassVar[bool] = True
    draws_noise: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "samples",
            "int",
            4,
            "noisy inputs (one forward and backward to the layer each)",
            low=1,
            cost="work",
            cap=200,
            passes=True,
        ),
        Option("noise", "float", 0.3, "σ of the Gaussian noise added to the inputs", low=0.0),
        Option(
            "noise_seed",
            "int",
            0,
            "seed of the input noise (None: one drawn from torch's generator per call)",
            nullable=True,
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        samples: int = 4,
        noise: float = 0.3,
        noise_seed: int | None = 0,
        **kw: Any,
    ) -> None:
        super().__init__(model, layer, noise_seed=self.option("noise_seed", noise_seed), **kw)
        self.samples = self.option("samples", samples)
        self.noise = float(self.option("noise", noise))

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        layer = context.layer
        if layer is None:
            raise RuntimeError("Smooth Grad-CAM++ needs the explained layer")
        x = context.inputs
        n = x.shape[0]
        seed = int(torch.randint(0, 2**62, (1,))) if self.noise_seed is None else self.noise_seed
        sums = [torch.zeros_like(acts) for _ in range(3)]  # Σ g, Σ g², Σ g³

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, self.samples, self.name)
            noise = torch.stack(
                [
                    torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + t))
                    for t in range(start, stop)
                ]
            ).to(device=x.device, dtype=x.dtype)
            noisy = (x.unsqueeze(0) + self.noise * noise).flatten(0, 1)
            with torch.enable_grad():
                out, act = _forward_from_layer(self, noisy, layer)
                if act.shape[1:] != acts.shape[1:]:
                    raise ValueError(
                        "Smooth Grad-CAM++ needs a channels-first layer output (N, K, *spatial)"
                    )
                (g,) = torch.autograd.grad(group_scores(out, context, n).sum(), act)
            g = g.detach().view(stop - start, *acts.shape)
            for power, total in enumerate(sums, start=1):
                total += g.pow(power).sum(0)

        runtime.run_chunked(
            self.samples, 2 * x.numel() * x.element_size(), self.samples, step, "noisy inputs"
        )
        d1, d2, d3 = (s / self.samples for s in sums)
        spatial = (acts * d3).flatten(2).sum(2).view(*acts.shape[:2], *([1] * (acts.ndim - 2)))
        denom = 2 * d2 + spatial
        nonzero = denom != 0
        alpha = (d2 / denom.where(nonzero, torch.ones_like(denom))).where(
            nonzero, torch.zeros_like(denom)
        )
        return (alpha * d1.clamp(min=0)).flatten(2).sum(2)
