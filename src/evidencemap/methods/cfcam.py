"""CF-CAM (He, Pan, Yao 2025, arXiv 2504.00060): cluster-filtered class activation maps.

The algorithm as its authors released it. With ``A ∈ R^{N×K×s}`` the layer's activations,
``G = ∂y^c/∂A`` and ``a_k`` the flattened map of channel ``k``:

1. **Split** (:func:`split_channels`): ``n_k = ‖a_k‖₂``, ``τ`` = 75th percentile of ``{n_k}``
   (linear interpolation); important channels ``I = {k : n_k ≥ τ}``, the rest ``R``.
2. **Cluster** (:func:`cluster_channels`): DBSCAN on the flattened activation maps of ``R``
   (Euclidean distances from ``torch.cdist``, handed to scikit-learn as a precomputed matrix),
   ``eps`` = 25th percentile of the off-diagonal distances among ``R`` floored at ``1e-5``,
   ``min_samples = max(2, ⌊0.05·|R|⌋)`` (:func:`dbscan_parameters`). DBSCAN's noise channels get
   weight 0.
3. **Scores** (:func:`channel_scores`): an important channel keeps the Grad-CAM score
   ``s_k = mean(G_k)``; for every cluster ``C_j`` the averaged gradient ``ḡ_j = mean_{k∈C_j} G_k``
   is filtered and every member gets ``s_k = mean(F(ḡ_j))``.
4. **Weights** (:func:`softmax_weights`): ``w_k = softmax_{k∈V}(s_k / T)`` over the valid
   channels ``V = I ∪ clustered``, 0 elsewhere (``T = 1`` as released; ``temperature="auto"``
   standardises the scores per image); ``L = ReLU(Σ_k w_k A_k)``, upsampled and normalised by the
   shared pipeline.

Filters: ``"gaussian"`` (default; what the paper names) is a normalised Gaussian of ``sigma``
feature cells with mirror padding (:func:`evidencemap.filters.gaussian_filter`); ``"released"``
is the released code's pseudo-bilateral kernel (:func:`released_filter`), to reproduce the
published protocol; ``"none"`` skips filtering (an ablation).

DBSCAN runs per image on the CPU (that is the algorithm); the split, the distances, the
per-cluster averaging and filtering (all clusters of all images at once) and the weights are
batched torch on the inputs' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap.filters import check_sigma, gaussian_filter
from evidencemap.methods.base import Context, LayerMethod, gradients_of
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register

__all__ = [
    "CFCAM",
    "CFCAM_FILTERS",
    "IMPORTANT",
    "NOISE",
    "ChannelGroups",
    "channel_scores",
    "cluster_channels",
    "dbscan_parameters",
    "percentile",
    "released_filter",
    "softmax_weights",
    "split_channels",
]

CFCAM_FILTERS = ("gaussian", "released", "none")

# Channel labels: important channels, DBSCAN noise; clusters are numbered 0, 1, … per image.
IMPORTANT = -2
NOISE = -1

# Floor of DBSCAN's eps (as released) and the released filter's normalisation guard.
MIN_EPS = 1e-5
RELEASED_NORM_EPS = 1e-6


def percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile along the last axis, linear interpolation (NumPy's default).

    ``v_(⌊p⌋) + (p − ⌊p⌋)(v_(⌈p⌉) − v_(⌊p⌋))`` with ``p = q/100·(n − 1)`` on the sorted values;
    no size limit (unlike ``torch.quantile``). ``(…, n)`` → ``(…)``.
    """
    n = values.shape[-1]
    ordered = values.sort(dim=-1).values
    pos = q / 100.0 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    low, high = ordered[..., lo], ordered[..., hi]
    return low + (pos - lo) * (high - low)


def split_channels(acts: Tensor, q: float = 75.0) -> Tensor:
    """Important channels: ``n_k ≥ τ`` with ``n_k = ‖a_k‖₂`` and ``τ`` its ``q``-th percentile.

    Args:
        acts: ``(N, K, *s)`` activations.
        q: the percentile of the channel norms that splits them.

    Returns:
        ``(N, K)`` boolean mask of the important channels (never empty: ``τ ≤ max n_k``).
    """
    norms = acts.flatten(2).norm(dim=2)
    return norms >= percentile(norms, q).unsqueeze(1)


def dbscan_parameters(distances: Tensor, q: float = 25.0) -> tuple[float, int]:
    """DBSCAN's ``eps`` and ``min_samples`` for the ``|R| × |R|`` distance matrix of ``R``.

    ``eps = max(percentile_q(off-diagonal distances), 1e-5)`` — every ordered pair ``(i ≠ j)``,
    as released — and ``min_samples = max(2, ⌊0.05·|R|⌋)``. With fewer than two channels there is
    no distance and ``eps`` is the floor.
    """
    r = distances.shape[0]
    min_samples = max(2, int(0.05 * r))
    if r < 2:
        return MIN_EPS, min_samples
    off = distances[~torch.eye(r, dtype=torch.bool, device=distances.device)]
    return max(float(percentile(off, q)), MIN_EPS), min_samples


@dataclass(frozen=True)
class ChannelGroups:
    """How CF-CAM grouped the channels of a batch.

    Attributes:
        labels: ``(N, K)`` long: :data:`IMPORTANT` (−2), :data:`NOISE` (−1) or the cluster
            number ``0 … J_n − 1`` of each channel.
        eps: ``(N,)`` DBSCAN's ``eps`` per image.
        min_samples: ``(N,)`` DBSCAN's ``min_samples`` per image.
    """

    labels: Tensor
    eps: Tensor
    min_samples: Tensor

    @property
    def clusters(self) -> Tensor:
        """``(N,)`` number of clusters per image."""
        return (self.labels.amax(dim=1) + 1).clamp(min=0)


def cluster_channels(acts: Tensor, important: Tensor, q: float = 25.0) -> ChannelGroups:
    """DBSCAN on the flattened activation maps of the non-important channels, per image.

    Args:
        acts: ``(N, K, *s)`` activations.
        important: ``(N, K)`` mask from :func:`split_channels`.
        q: percentile of the pairwise distances that sets ``eps``.

    Returns:
        The :class:`ChannelGroups` of the batch (labels on the activations' device).
    """
    from sklearn.cluster import DBSCAN

    n, k = acts.shape[:2]
    # On the CPU in float64 (DBSCAN runs there anyway; devices such as MPS have no float64).
    flat = acts.detach().flatten(2).cpu().double()
    # Exact pairwise distances (no matrix-product shortcut: identical points stay at 0).
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    rest_mask = ~important.cpu()
    labels = torch.full((n, k), IMPORTANT, dtype=torch.long)
    eps = torch.zeros(n, dtype=torch.float64)
    min_samples = torch.zeros(n, dtype=torch.long)
    for i in range(n):  # DBSCAN is a per-image CPU algorithm
        rest = rest_mask[i].nonzero().squeeze(1)
        d = dist[i].index_select(0, rest).index_select(1, rest)
        e, m = dbscan_parameters(d, q)
        eps[i], min_samples[i] = e, m
        if rest.numel() == 0:
            continue
        found = DBSCAN(eps=e, min_samples=m, metric="precomputed").fit(d.numpy()).labels_
        labels[i, rest] = torch.from_numpy(found).long()
    return ChannelGroups(labels.to(acts.device), eps, min_samples)


def released_filter(maps: Tensor, sigma_spatial: float = 5.0, sigma_range: float = 0.1) -> Tensor:
    """The released code's "bilateral" filter of each map ``ḡ`` of ``(J, *s)`` (2-D or 3-D).

    One kernel per map, the size of the map:
    ``W(p) = exp(−‖p − c‖² / (2σ_s²)) · exp(−(ḡ(p) − mean ḡ)² / (2σ_r²))``, ``c_a = L_a / 2``
    on every axis of length ``L_a`` (a half-cell off centre for odd sizes, as released),
    ``W ← W / (Σ W + 1e-6)``, applied as a cross-correlation with zero ``'same'`` padding
    (``⌊(L_a − 1)/2⌋`` cells before, the rest after). Not a true bilateral filter: the range
    term compares each cell with the map's mean, not with the centre cell.

    Returns:
        ``(J, *s)`` filtered maps.
    """
    if maps.ndim not in (3, 4):
        raise ValueError(
            f"released_filter takes (J, H, W) or (J, D, H, W) maps, got {tuple(maps.shape)}"
        )
    j, spatial = maps.shape[0], maps.shape[1:]
    axes = [torch.arange(n, dtype=maps.dtype, device=maps.device) - n / 2 for n in spatial]
    grids = torch.meshgrid(*axes, indexing="ij")
    spatial_w = torch.exp(-torch.stack([g**2 for g in grids]).sum(0) / (2 * sigma_spatial**2))
    dev = maps - maps.flatten(1).mean(1).view(j, *([1] * len(spatial)))
    kernel = spatial_w * torch.exp(-(dev**2) / (2 * sigma_range**2))
    kernel = kernel / (kernel.flatten(1).sum(1).view(j, *([1] * len(spatial))) + RELEASED_NORM_EPS)
    pad: list[int] = []
    for n in reversed(spatial):  # F.pad lists the last axis first
        pad += [(n - 1) // 2, n - 1 - (n - 1) // 2]
    padded = F.pad(maps.unsqueeze(0), pad)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    return conv(padded, kernel.unsqueeze(1), groups=j).squeeze(0)


def channel_scores(grads: Tensor, labels: Tensor, filt: Any) -> Tensor:
    """Per-channel scores ``s`` ``(N, K)`` (0 for noise channels).

    Important channels: ``s_k = mean(G_k)``. Cluster ``C_j``: ``ḡ_j = mean_{k∈C_j} G_k``, then
    every member gets ``mean(filt(ḡ_j))``. All clusters of all images are averaged with one
    batched membership product (deterministic) and filtered in one call.

    Args:
        grads: ``(N, K, *s)`` gradients.
        labels: ``(N, K)`` labels of :class:`ChannelGroups`.
        filt: ``(J, *s) → (J, *s)`` filter of the averaged cluster gradients.
    """
    n = grads.shape[0]
    flat = grads.flatten(2)
    scores = torch.where(
        labels == IMPORTANT, flat.mean(2), torch.zeros((), dtype=grads.dtype, device=grads.device)
    )
    j_max = int(labels.amax()) + 1 if labels.numel() else 0
    if j_max <= 0:
        return scores
    ids = torch.arange(j_max, device=labels.device)
    member = (labels.unsqueeze(1) == ids.view(1, -1, 1)).to(grads.dtype)  # (N, J, K)
    counts = member.sum(2)  # (N, J)
    present = counts > 0
    means = (member @ flat) / counts.clamp(min=1).unsqueeze(2)  # (N, J, Z)
    filtered = filt(means[present].view(-1, *grads.shape[2:]))
    cluster_score = torch.zeros(n, j_max, dtype=grads.dtype, device=grads.device)
    cluster_score[present] = filtered.flatten(1).mean(1)
    clustered = labels >= 0
    picked = cluster_score.gather(1, labels.clamp(min=0))
    return torch.where(clustered, picked, scores)


def softmax_weights(scores: Tensor, labels: Tensor, temperature: float | str = 1.0) -> Tensor:
    """``w_k = softmax_{k∈V}(s_k / T)`` over the valid (non-noise) channels, 0 for noise channels.

    Args:
        scores: ``(N, K)`` channel scores.
        labels: ``(N, K)`` channel labels (:data:`NOISE` marks the dropped channels).
        temperature: ``T``. ``1.0`` is the released method. ``"auto"`` sets ``T`` per image to
            the standard deviation of the valid channels' scores, so that the softmax sees
            standardised scores and the weights no longer collapse to uniform when the raw
            gradient means are tiny (``T`` falls back to 1 where that deviation is 0).

    Returns:
        ``(N, K)`` weights; each row sums to 1 over its valid channels.
    """
    valid = labels != NOISE
    if temperature == "auto":
        count = valid.sum(1, keepdim=True).clamp(min=1)
        mean = scores.where(valid, 0).sum(1, keepdim=True) / count
        var = (scores - mean).where(valid, 0).pow(2).sum(1, keepdim=True) / count
        std = var.sqrt()
        scale = torch.where(std > 0, std, torch.ones_like(std))
    else:
        scale = torch.as_tensor(float(temperature), dtype=scores.dtype, device=scores.device)
    logits = (scores / scale).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return weights.where(valid, torch.zeros((), dtype=weights.dtype, device=weights.device))


@register
class CFCAM(LayerMethod):
    """CF-CAM, as released by its authors; see the module docstring for every step.

    Args:
        model / layer: as for every layer method (default layer: the last spatial one).
        filter: ``"gaussian"`` (default), ``"released"`` (the authors' pseudo-bilateral kernel)
            or ``"none"``.
        sigma: the Gaussian's standard deviation in feature cells (``filter="gaussian"``).
        sigma_spatial / sigma_range: the released kernel's σ_s and σ_r (``filter="released"``).
        important_percentile: percentile of channel norms above which channels are important.
        eps_percentile: percentile of the pairwise distances that sets DBSCAN's ``eps``.
        temperature: softmax temperature ``T`` of the weights (:func:`softmax_weights`):
            ``1.0`` as released, or ``"auto"`` (per-image standardised scores; class-sensitive).
        **kw: shared options (``relu``, ``gradient_noise``, ``noise_seed``, ``batch_size`` …).

    Raises:
        ValueError: for an unknown filter, a bad sigma, a percentile outside [0, 100] or a
            temperature that is neither positive nor ``"auto"``.
    """

    name = "cfcam"
    aliases: ClassVar[tuple[str, ...]] = ("cf-cam",)
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("filter", "str", "gaussian", "cluster-gradient filter", choices=CFCAM_FILTERS),
        Option("sigma", "float", 1.0, "Gaussian σ in feature cells", low=0.0, low_open=True),
        Option("sigma_spatial", "float", 5.0, "released kernel's σ_s", low=0.0, low_open=True),
        Option("sigma_range", "float", 0.1, "released kernel's σ_r", low=0.0, low_open=True),
        Option(
            "important_percentile",
            "float",
            75.0,
            "percentile of channel norms above which channels are important",
            low=0.0,
            high=100.0,
        ),
        Option(
            "eps_percentile",
            "float",
            25.0,
            "percentile of pairwise distances that sets DBSCAN's eps",
            low=0.0,
            high=100.0,
        ),
        Option(
            "temperature",
            "float",
            1.0,
            "softmax temperature of the weights",
            low=0.0,
            low_open=True,
            other="'auto'",
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        filter: str = "gaussian",
        sigma: float = 1.0,
        sigma_spatial: float = 5.0,
        sigma_range: float = 0.1,
        important_percentile: float = 75.0,
        eps_percentile: float = 25.0,
        temperature: float | str = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(model, layer, **kw)
        if not isinstance(filter, str) or filter not in CFCAM_FILTERS:
            raise ValueError(f"filter must be one of {CFCAM_FILTERS}, got {filter!r}")
        self.filter = filter
        self.sigma = check_sigma(sigma, "sigma")
        self.sigma_spatial = check_sigma(sigma_spatial, "sigma_spatial")
        self.sigma_range = check_sigma(sigma_range, "sigma_range")
        for value, label in (
            (important_percentile, "important_percentile"),
            (eps_percentile, "eps_percentile"),
        ):
            check_sigma(value, label, allow_zero=True)
            if value > 100:
                raise ValueError(f"{label} must be in [0, 100], got {value}")
        self.important_percentile = float(important_percentile)
        self.eps_percentile = float(eps_percentile)
        if temperature != "auto":
            if isinstance(temperature, bool) or not isinstance(temperature, int | float):
                raise TypeError(
                    f"temperature must be a positive number or 'auto', got {temperature!r}"
                )
            if not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(
                    f"temperature must be a positive number or 'auto', got {temperature!r}"
                )
        self.temperature: float | str = temperature if temperature == "auto" else float(temperature)

    def filter_maps(self, maps: Tensor) -> Tensor:
        """Apply the chosen filter to averaged cluster gradients ``(J, *s)``."""
        if self.filter == "gaussian":
            return gaussian_filter(maps.unsqueeze(1), self.sigma).squeeze(1)
        if self.filter == "released":
            return released_filter(maps, self.sigma_spatial, self.sigma_range)
        return maps

    def groups(self, acts: Tensor) -> ChannelGroups:
        """Split and cluster the channels of ``acts`` ``(N, K, *s)``."""
        important = split_channels(acts, self.important_percentile)
        return cluster_channels(acts, important, self.eps_percentile)

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        groups = self.groups(acts)
        scores = channel_scores(gradients_of(grads), groups.labels, self.filter_maps)
        return softmax_weights(scores, groups.labels, self.temperature).to(acts.dtype)
