"""Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``).

``M = Σ_k ReLU(g_k ⊙ A_k)`` with ``A ∈ R^{N×K×s}`` the layer's activations and ``g = ∂y^c/∂A``:
each position's product of gradient and activation is rectified *before* the sum over channels,
so a channel's negative evidence at a position cannot cancel another's positive evidence there
(HiResCAM sums first, ``Σ_k g_k ⊙ A_k``; LayerCAM rectifies only the gradient,
``Σ_k ReLU(g_k) ⊙ A_k``). The map is ≥ 0 before the pipeline's ReLU, then upsampled and
normalised like every CAM. pytorch-grad-cam's ``eigen_smooth`` (the first principal component of
the products) is not offered.
"""

from __future__ import annotations

from torch import Tensor

from evidencemap.methods.base import Context, LayerMethod, gradients_of
from evidencemap.methods.registry import register

__all__ = ["GradCAMElementWise"]


@register
class GradCAMElementWise(LayerMethod):
    """Grad-CAM element-wise: ``M = Σ_k ReLU(g_k ⊙ A_k)`` (rectified per position and channel)."""

    name = "gradcam_elementwise"
    aliases = ("gradcam-elementwise", "grad-cam-elementwise")

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return (gradients_of(grads) * acts).clamp(min=0).sum(dim=1, keepdim=True)
