"""The CAM family: CAM, Grad-CAM (+ counterfactual), Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM,
Eigen-CAM.

Notation: ``A ∈ R^{N×K×s}`` the layer's activations (``s`` = its spatial axes, 2-D or 3-D),
``g = ∂y^c/∂A`` the gradients of the target score, ``Z`` the number of spatial positions. Every
map is ``ReLU``-ed (unless ``relu=False``), upsampled and normalised by the shared pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.methods.base import Context, LayerMethod, gradients_of
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register

__all__ = ["CAM", "EigenCAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "XGradCAM"]


def _spatial_sum(t: Tensor) -> Tensor:
    """Sum over all spatial axes: ``(N, K, *s)`` → ``(N, K)``."""
    return t.flatten(2).sum(2)


@register
class GradCAM(LayerMethod):
    """Grad-CAM (Selvaraju et al. 2017): ``L = ReLU(Σ_k α_k A_k)``, ``α_k = (1/Z) Σ_ij g_k,ij``.

    With ``counterfactual=True`` the gradient is negated, ``α_k = (1/Z) Σ_ij −g_k,ij``: the map
    shows evidence *against* the target (regions whose removal raises its score).
    """

    name = "gradcam"
    aliases = ("grad-cam",)
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("counterfactual", "bool", False, "negate the gradient: evidence against the target"),
    )

    def __init__(
        self, model: nn.Module, layer: Any = None, *, counterfactual: bool = False, **kw: Any
    ) -> None:
        super().__init__(model, layer, **kw)
        self.counterfactual = self.option("counterfactual", counterfactual)

    def flat_map_reason(self) -> str:
        if self.counterfactual and self.relu:
            return (
                "counterfactual=True keeps negative evidence only (regions whose removal raises "
                "the target's score), and this layer has none for the target"
            )
        return super().flat_map_reason()

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        weights = gradients_of(grads).flatten(2).mean(2)
        return -weights if self.counterfactual else weights


@register
class GradCAMPlusPlus(LayerMethod):
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form for ``Y = exp(S)``:

    ``w_k = Σ_ij α_k,ij ReLU(g_k,ij)`` with ``α = g² / (2g² + (Σ_ab A_k,ab) g³)`` and ``α = 0``
    where the denominator is 0.
    """

    name = "gradcam++"
    aliases = ("gradcampp", "grad-cam++")

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        grads = gradients_of(grads)
        g2 = grads.pow(2)
        sum_a = acts.flatten(2).sum(2).view(*acts.shape[:2], *([1] * (acts.ndim - 2)))
        denom = 2 * g2 + sum_a * grads.pow(3)
        nonzero = denom != 0
        alpha = g2 / denom.where(nonzero, torch.ones_like(denom))
        alpha = alpha.where(nonzero, torch.zeros_like(alpha))
        return _spatial_sum(alpha * grads.clamp(min=0))


@register
class XGradCAM(LayerMethod):
    """XGrad-CAM (Fu et al. 2020): ``α_k = Σ_ij (A_k,ij / (Σ_ab A_k,ab + 1e-7)) g_k,ij``."""

    name = "xgradcam"
    aliases = ("xgrad-cam",)

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        grads = gradients_of(grads)
        sums = acts.flatten(2).sum(2, keepdim=True)
        return (acts.flatten(2) / (sums + 1e-7) * grads.flatten(2)).sum(2)


@register
class LayerCAM(LayerMethod):
    """LayerCAM (Jiang et al. 2021): ``M = ReLU(Σ_k ReLU(g_k) ⊙ A_k)`` (per-position weights)."""

    name = "layercam"

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return (gradients_of(grads).clamp(min=0) * acts).sum(dim=1, keepdim=True)


@register
class HiResCAM(LayerMethod):
    """HiResCAM (Draelos & Carin 2020): ``M = Σ_k g_k ⊙ A_k`` (no spatial averaging).

    Equals CAM exactly on conv → global-average-pool → linear networks (up to the factor 1/Z).
    """

    name = "hirescam"

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return (gradients_of(grads) * acts).sum(dim=1, keepdim=True)


@register
class CAM(LayerMethod):
    """CAM (Zhou et al. 2016): ``M_c = Σ_k w_k^c A_k`` with ``w^c`` the final linear layer's row.

    Needs a network that ends conv → global average pooling → linear, explained at the layer
    whose pooled output feeds that linear layer; this is checked by recomputing the logits
    ``GAP(A) Wᵀ + b`` and comparing them with the model's output.
    """

    name = "cam"
    needs_gradients = False
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "fc",
            "str",
            None,
            "the final linear layer (default: the model's last nn.Linear)",
            other="an nn.Linear",
            nullable=True,
            reported=False,
        ),
    )

    def __init__(
        self, model: nn.Module, layer: Any = None, *, fc: nn.Linear | str | None = None, **kw: Any
    ) -> None:
        super().__init__(model, layer, **kw)
        if isinstance(fc, str):
            fc = self.model.get_submodule(fc)  # type: ignore[assignment]
        if fc is not None and not isinstance(fc, nn.Linear):
            raise TypeError(f"fc must be an nn.Linear or its dotted name, got {type(fc).__name__}")
        self.fc = fc

    def _linear(self, channels: int) -> nn.Linear:
        if self.fc is not None:
            return self.fc
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[-1].in_features != channels:
            raise ValueError(
                "CAM needs a model that ends conv → global average pooling → linear, with the "
                f"explained layer's {channels} channels feeding the last nn.Linear; "
                "use gradcam (identical for such models) for other architectures"
            )
        return linears[-1]

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        classes = context.target.classes
        if classes is None:
            raise ValueError("CAM explains a class: target must be None, an int or class indices")
        fc = self._linear(acts.shape[1])
        with torch.no_grad():
            pooled = acts.flatten(2).mean(2)
            logits = nn.functional.linear(pooled, fc.weight, fc.bias)
        out = context.output
        if out.shape != logits.shape or not torch.allclose(logits, out, rtol=1e-3, atol=1e-3):
            raise ValueError(
                "CAM needs the explained layer to feed global average pooling → the last linear "
                "layer directly (recomputed logits differ from the model's output); "
                "use gradcam for this model"
            )
        return fc.weight[classes].to(acts.dtype)


@register
class EigenCAM(LayerMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): the first principal component of the activations.

    Per sample ``M = (A − Ā) v₁`` with ``A`` reshaped to ``(positions × K)``, ``Ā`` its column
    means and ``v₁`` the first right singular vector (batched reduced SVD). Class-agnostic. The
    SVD's sign is fixed so that ``M`` correlates positively with the channel-mean activation.
    """

    name = "eigencam"
    aliases = ("eigen-cam",)
    needs_gradients = False

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        n, _k = acts.shape[:2]
        flat = acts.flatten(2).transpose(1, 2).float()  # (N, Z, K)
        centred = flat - flat.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = centred @ vh[:, 0, :].unsqueeze(2)  # (N, Z, 1)
        energy = flat.mean(dim=2, keepdim=True)
        sign = torch.sign((proj * (energy - energy.mean(1, keepdim=True))).sum(1, keepdim=True))
        proj = proj * sign.where(sign != 0, torch.ones_like(sign))
        return proj.transpose(1, 2).reshape(n, 1, *acts.shape[2:]).to(acts.dtype)
