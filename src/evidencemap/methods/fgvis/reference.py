"""What FGVis' removed pixels become: the reference ``r`` of ``e = m ⊙ x + (1 − m) ⊙ r``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FGVIS_REFERENCES", "gaussian_blur", "reference_for"]

FGVIS_REFERENCES = ("zero", "blur", "mean")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, *S)`` over every spatial axis (reflect padding).

    The kernel has radius ``ceil(3σ)`` (clipped so the padding fits the axis) and sums to 1.
    """
    if sigma <= 0:
        return x.clone()
    out = x
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    for axis in range(2, x.ndim):
        size = x.shape[axis]
        radius = min(math.ceil(3 * sigma), size - 1)
        if radius < 1:
            continue
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        moved = out.movedim(axis, -1)
        shape = moved.shape
        line = moved.reshape(-1, 1, size)
        line = F.conv1d(F.pad(line, (radius, radius), mode="reflect"), kernel)
        out = line.reshape(shape).movedim(-1, axis)
    return out.reshape(n, c, *spatial)


def reference_for(reference: str | float | Tensor, x: Tensor, blur_sigma: float) -> Tensor:
    """The reference ``r`` for inputs ``x`` ``(N, C, *S)``, broadcast to ``x``'s shape.

    ``"zero"``: 0; ``"blur"``: :func:`gaussian_blur` with σ = ``blur_sigma``; ``"mean"``: each
    sample's per-channel mean; a number: that constant; a tensor broadcastable to ``x``
    (``(C, *S)`` gets a batch axis first).

    Raises:
        ValueError: for a tensor that does not broadcast, or one with NaN / infinite values.
    """
    ref = reference
    if isinstance(ref, str):
        if ref == "zero":
            return torch.zeros_like(x)
        if ref == "blur":
            return gaussian_blur(x, blur_sigma)
        return x.flatten(2).mean(2).view(*x.shape[:2], *([1] * (x.ndim - 2))).expand_as(x)
    if isinstance(ref, Tensor):
        given = tuple(ref.shape)
        if not ref.is_floating_point() and ref.dtype != torch.bool:
            ref = ref.float()
        ref = ref.to(device=x.device, dtype=x.dtype)
        if ref.ndim == x.ndim - 1:
            ref = ref.unsqueeze(0)
        try:
            out = torch.broadcast_to(ref, x.shape)
        except RuntimeError:
            raise ValueError(
                f"reference of shape {given} does not broadcast to the "
                f"inputs {tuple(x.shape)}; give (C, *S), (1 or N, C, *S) or a broadcastable shape"
            ) from None
        if not bool(torch.isfinite(out).all()):
            raise ValueError("reference contains NaN or infinite values")
        return out.detach()
    return torch.full_like(x, float(ref))
