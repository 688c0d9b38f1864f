"""Map post-processing shared by all methods: N-d upsampling and per-sample normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize", "upsample"]

# Range below which a map counts as flat (→ zeros, never 0/0).
FLAT_EPS = 1e-12


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(N, C, *s)`` maps to spatial ``size`` (2-D bilinear, 3-D trilinear).

    ``align_corners=False``; maps already of that size are returned unchanged.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    if len(size) not in (1, 2, 3):
        raise ValueError(f"size must have 1 to 3 spatial axes, got {size}")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def normalize(maps: Tensor) -> Tensor:
    """Min-max normalise each sample of ``(N, …)`` to [0, 1].

    ``m̂ = (m − min m) / (max m − min m)`` per sample; a sample whose range is below
    ``FLAT_EPS`` becomes all zeros.
    """
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    ok = span > FLAT_EPS
    out = (flat - low) / span.where(ok, span.new_ones(()))
    return out.where(ok, out.new_zeros(())).view_as(maps)
