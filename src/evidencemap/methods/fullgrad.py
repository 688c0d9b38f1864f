"""FullGrad (Srinivas & Fleuret, NeurIPS 2019), as pytorch-grad-cam computes it.

With ``x ∈ R^{N×C×S}`` the inputs, ``y_c`` the target's score, and for every convolution and
batch-norm layer ``l`` with a bias its output ``z_l ∈ R^{N×K_l×s_l}`` and effective bias ``b_l``
(a convolution's ``bias``; a batch norm's ``β − μ γ / √(σ² + ε)``, its running statistics),

``M = Σ_c ψ(|x_c ⊙ ∂y_c/∂x_c|) + Σ_l Up( Σ_k ψ(|b_l,k · ∂y_c/∂z_l,k|) )``

where ``ψ`` min-max normalises each map of one image and channel, ``v ↦ (v − min v) /
(max(v − min v) + 1e-7)``, and ``Up`` resizes to the input's size (bilinear / trilinear).
The result is normalised like every map. 2-D and 3-D layers alike (``nn.Conv1d/2d/3d``,
``nn.BatchNorm1d/2d/3d`` with a spatial output).

pytorch-grad-cam resizes every channel of every layer to the input's size before summing the
channels (in NumPy, per image); resizing is linear, so here each layer's channels are summed at
the layer's resolution and the sum is resized once — the same map, without ``K_l`` full-size
copies per layer. One forward and one backward pass give every layer's gradient.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from evidencemap.maps import upsample
from evidencemap.methods.base import Attribution, InputMethod
from evidencemap.methods.registry import register
from evidencemap.targets import Target, resolve

__all__ = ["FullGrad", "bias_layers", "effective_bias"]


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """The convolution and batch-norm layers of ``model`` that have a bias, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, (_ConvNd, _BatchNorm)) and getattr(m, "bias", None) is not None
    ]


def effective_bias(layer: nn.Module) -> Tensor:
    """``b`` ``(K,)``: a convolution's bias, a batch norm's ``β − μ γ / √(σ² + ε)``."""
    if isinstance(layer, _BatchNorm) and layer.running_mean is not None:
        mean = layer.running_mean
        var = layer.running_var if layer.running_var is not None else torch.ones_like(mean)
        scale = layer.weight if layer.weight is not None else torch.ones_like(mean)
        return layer.bias - mean * scale / torch.sqrt(var + layer.eps)
    return layer.bias  # type: ignore[return-value]


def _scaled(v: Tensor) -> Tensor:
    """ψ: per (image, channel) ``(v − min) / (max(v − min) + 1e-7)`` of ``(N, K, *s)``."""
    flat = v.flatten(2)
    flat = flat - flat.amin(2, keepdim=True)
    return (flat / (flat.amax(2, keepdim=True) + 1e-7)).view_as(v)


@register
class FullGrad(InputMethod):
    """FullGrad: input-gradient and every bias-gradient map, normalised and summed.

    See the module docstring for the formula. It reads every convolution and batch norm with a
    bias through forward hooks (one forward and one backward pass).
    """

    name = "fullgrad"
    aliases: ClassVar[tuple[str, ...]] = ("full-grad",)
    uses_layer: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, model: nn.Module, *, compiled: bool = False) -> str | None:
        if compiled:
            return (
                "it reads the bias layers through forward hooks, which TorchScript models never run"
            )
        return None

    @property
    def hooks_layers(self) -> bool:
        return True

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        layers = bias_layers(self.model)
        x = x.detach().requires_grad_(True)
        recorded: dict[nn.Module, Tensor] = {}

        def keep(module: nn.Module, _args: Any, out: Any) -> Tensor | None:
            if not isinstance(out, Tensor):
                return None
            recorded[module] = out  # its last call; the model goes on with a copy, so an
            return out.clone()  # in-place op after the layer cannot change the recorded output

        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            with torch.enable_grad():
                output = self.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        found = [m for m in layers if m in recorded and recorded[m].ndim == x.ndim]
        outs = [recorded[m] for m in found]
        with torch.enable_grad():
            resolved = resolve(target, output)
            scores = resolved.score(output)
            grads = torch.autograd.grad(scores.sum(), [x, *outs], allow_unused=True)
        size = x.shape[2:]
        total = _scaled((grads[0] * x).abs().detach()).sum(1, keepdim=True)
        for layer, grad in zip(found, grads[1:], strict=True):
            if grad is None:
                continue
            bias = effective_bias(layer).detach().to(grad.dtype)
            bias = bias.view(1, -1, *([1] * (grad.ndim - 2)))
            total = total + upsample(_scaled((bias * grad).abs()).sum(1, keepdim=True), size)
        extras: dict[str, Any] = {"bias_layers": len(found)}
        return Attribution(total.detach(), output.detach(), resolved, scores.detach(), extras)

    def reduce(self, raw: Tensor) -> Tensor:
        """The map is ``raw`` itself (one channel)."""
        return raw
