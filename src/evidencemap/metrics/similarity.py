"""Similarity of two batches of maps: Pearson and Spearman correlation, SSIM.

All take ``(N, …)`` tensors and compare sample ``i`` of one with sample ``i`` of the other,
batched. A correlation that is undefined (a constant map) is reported as ``0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_ranks", "pearson", "spearman", "ssim"]

# Variance below which a map counts as constant for a correlation.
_FLAT_VAR = 1e-12


def _check_pair(a: Tensor, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("both maps must be torch.Tensors")
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"maps must be batches (N, …) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per sample: ``(N, …)``, ``(N, …)`` → ``(N,)`` in [−1, 1].

    ``ρ = Σ (a − ā)(b − b̄) / sqrt(Σ (a − ā)² Σ (b − b̄)²)``; ``0`` when either is constant.
    """
    _check_pair(a, b)
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    va, vb = (a * a).mean(1), (b * b).mean(1)
    ok = (va > _FLAT_VAR) & (vb > _FLAT_VAR)
    rho = (a * b).mean(1) / (va * vb).where(ok, torch.ones_like(va)).sqrt()
    return rho.where(ok, torch.zeros_like(rho)).clamp(-1, 1).float()


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``0 … P−1`` of each row of ``(N, P)``, tied values sharing their average rank."""
    n, p = x.shape
    values, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.long().cumsum(1) - 1 + torch.arange(n, device=x.device).view(n, 1) * p
    position = torch.arange(p, device=x.device, dtype=torch.float64).expand(n, p)
    flat_group = group.flatten()
    first = torch.full((n * p,), float(p), device=x.device, dtype=torch.float64)
    last = torch.full((n * p,), -1.0, device=x.device, dtype=torch.float64)
    first = first.scatter_reduce(0, flat_group, position.flatten(), "amin")
    last = last.scatter_reduce(0, flat_group, position.flatten(), "amax")
    mean_rank = ((first + last) / 2)[flat_group].view(n, p)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per sample (Pearson of average ranks) → ``(N,)``."""
    _check_pair(a, b)
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def ssim(
    a: Tensor, b: Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """Mean structural similarity per sample of maps ``(N, 1, *S)`` (2-D or 3-D) → ``(N,)``.

    Wang et al. (2004): Gaussian window (``window`` taps, ``σ = 1.5``, separable), ``K1 = 0.01``,
    ``K2 = 0.03``, ``C_i = (K_i · data_range)²``,
    ``SSIM = (2μ_aμ_b + C1)(2σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))`` averaged over
    the positions where the window fits (as ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``). A map smaller than ``window`` on
    some axis uses the largest odd window that fits.

    Raises:
        ValueError: for mismatched shapes or maps without 2 or 3 spatial axes.
    """
    _check_pair(a, b)
    dims = a.ndim - 2
    if dims not in (2, 3) or a.shape[1] != 1:
        raise ValueError(f"ssim needs maps (N, 1, H, W) or (N, 1, D, H, W), got {tuple(a.shape)}")
    size = min(window, *a.shape[2:])
    size -= 1 - size % 2
    conv = F.conv2d if dims == 2 else F.conv3d
    t = torch.arange(size, device=a.device, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    def filt(x: Tensor) -> Tensor:
        for axis in range(dims):
            shape = [1] * dims
            shape[axis] = size
            x = conv(x, kernel.view(1, 1, *shape))
        return x

    a, b = a.double(), b.double()
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(1).float()
