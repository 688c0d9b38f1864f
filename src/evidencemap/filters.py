"""N-d smoothing filters on ``(B, C, *s)`` tensors (2-D or 3-D spatial axes, batched).

* :func:`gaussian_filter` — a normalised Gaussian applied as separable 1-D convolutions along
  each spatial axis with mirror padding (``d c b | a b c d | c b a``, scipy's ``mode="mirror"``,
  torch's ``"reflect"``), kernel radius ``⌊truncate·σ + ½⌋`` as in scipy. Used by CF-CAM's
  cluster-gradient filter and by the blurred baseline of Integrated Gradients.
  With ``padding="zero"`` and a fixed ``radius`` it is also the RISE blur of the deletion /
  insertion substrate (kernel of 11 taps, σ = 5, zero padding).
* :func:`mirror_indices` — the index map of that padding, valid for any radius (also larger
  than the axis).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FILTER_PADDINGS",
    "check_sigma",
    "gaussian_filter",
    "gaussian_kernel1d",
    "mirror_indices",
]


def check_sigma(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number > 0 (≥ 0 with ``allow_zero``).

    Raises:
        TypeError: when ``value`` is not a real number.
        ValueError: when it is negative, zero (unless allowed), NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return out


def gaussian_kernel1d(
    sigma: float, radius: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``k_i = exp(−i²/(2σ²)) / Σ_j exp(−j²/(2σ²))`` for ``i = −radius … radius``.

    Computed in float64 on the CPU (devices such as MPS have no float64), then moved.
    """
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype).to(device)


def mirror_indices(length: int, radius: int, device: torch.device | None = None) -> Tensor:
    """Indices ``(length + 2·radius,)`` that mirror-pad an axis of ``length`` by ``radius``.

    Position ``j ∈ [−radius, length + radius)`` maps to ``j`` reflected about the first and last
    sample (without repeating them), periodically with period ``2(length − 1)``; an axis of
    length 1 maps everything to 0.
    """
    j = torch.arange(-radius, length + radius, device=device)
    if length == 1:
        return torch.zeros_like(j)
    period = 2 * (length - 1)
    j = j.remainder(period)
    return torch.where(j > length - 1, period - j, j)


FILTER_PADDINGS = ("mirror", "zero")


def gaussian_filter(
    maps: Tensor,
    sigma: float,
    truncate: float = 4.0,
    *,
    radius: int | None = None,
    padding: str = "mirror",
) -> Tensor:
    """Gaussian smoothing of every ``(B, C, *s)`` map along all its spatial axes.

    ``out = maps ∗ G_σ`` with the separable normalised kernel of :func:`gaussian_kernel1d`,
    radius ``⌊truncate·σ + ½⌋`` (or ``radius``) and mirror padding (so a constant map stays
    constant). Matches ``scipy.ndimage.gaussian_filter(m, σ, mode="mirror", truncate=truncate)``
    per map. ``padding="zero"`` pads with zeros instead (``mode="constant"``; the RISE blur).

    Args:
        maps: ``(B, C, *s)`` floating tensor with 1 to 3 spatial axes.
        sigma: standard deviation in cells (> 0).
        truncate: kernel half-width in standard deviations.
        radius: the kernel half-width in cells, instead of ``truncate``.
        padding: ``"mirror"`` or ``"zero"``.

    Returns:
        A tensor of the same shape, dtype and device.

    Raises:
        ValueError: for a tensor without spatial axes, a bad ``sigma``, radius or padding.
    """
    sigma = check_sigma(sigma, "sigma")
    if maps.ndim < 3:
        raise ValueError(f"maps must be (B, C, *spatial), got shape {tuple(maps.shape)}")
    if padding not in FILTER_PADDINGS:
        raise ValueError(f"padding must be one of {FILTER_PADDINGS}, got {padding!r}")
    if radius is None:
        radius = int(truncate * sigma + 0.5)
    elif isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    if radius == 0:
        return maps
    kernel = gaussian_kernel1d(sigma, radius, maps.dtype, maps.device).view(1, 1, -1)
    out = maps
    for axis in range(2, maps.ndim):
        moved = out.movedim(axis, -1)
        length = moved.shape[-1]
        if padding == "mirror":
            padded = moved.index_select(-1, mirror_indices(length, radius, maps.device))
        else:
            padded = F.pad(moved, (radius, radius))
        smoothed = F.conv1d(padded.reshape(-1, 1, length + 2 * radius), kernel)
        out = smoothed.reshape(moved.shape).movedim(-1, axis)
    return out
