"""The pointing game (Zhang et al. 2016) and its energy-based variant (Wang et al. 2020).

Ground truth per map: a boolean mask of shape ``S`` (or ``(1, *S)``), or boxes — a sequence /
``(K, 2d)`` tensor of ``[x0, y0, x1, y1]`` (2-D) or ``[x0, y0, z0, x1, y1, z1]`` (3-D, ``z``
the depth axis ``D``) in input pixels. A box covers the pixels whose unit square ``[c, c+1)``
overlaps ``[x0, x1]`` on every axis.

* Pointing game: the point is the arg-max of the map (the first one in raster order); it is a
  **hit** when it lies closer than ``τ`` pixels (Euclidean distance ``< τ``, default 15, as in
  TorchRay's benchmark) to a ground-truth pixel. A flat map (all values equal, e.g. the zeros
  of a normalised map without evidence) points nowhere and counts as a **miss**. Accuracy per
  class = hits / (hits + misses); the game's score is the mean over classes.
* Energy-based pointing game: ``Σ (s ⊙ g) / Σ s``, the share of the (non-negative) map's mass
  inside the ground truth ``g``; ``0`` for an all-zero map.

Both are higher-is-better and work on 3-D volumes. They read only maps: the map of a sample
must be the explanation of the class whose ground truth is given, at the resolution the
ground truth is given in (the input's: boxes are read in the map's pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from evidencemap.methods.options import Option
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import Metric

__all__ = ["EnergyPointingGame", "PointingGame", "PointingResult", "ground_truth_masks"]

GroundTruth = Tensor | Sequence[Sequence[float]]


def _check_map_batch(maps: Any) -> Tensor:
    if hasattr(maps, "maps") and isinstance(maps.maps, Tensor):
        maps = maps.maps
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor or an Explanation, got {type(maps).__name__}")
    if maps.ndim in (4, 5) and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim not in (3, 4):
        raise ValueError(
            f"maps must be (N, 1, H, W), (N, H, W), (N, 1, D, H, W) or (N, D, H, W), got {tuple(maps.shape)}"
        )
    maps = maps.detach().float()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contains NaN or infinite values")
    return maps


def _box_mask(boxes: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Union of ``(K, 2d)`` boxes ``[x0, y0, (z0,) x1, y1, (z1)]`` as a bool mask ``S``."""
    d = len(spatial)
    mask = torch.ones((boxes.shape[0], *spatial), dtype=torch.bool, device=boxes.device)
    for k in range(d):  # coordinate k (x, y, z) is spatial axis d-1-k
        axis = d - 1 - k
        c = torch.arange(spatial[axis], device=boxes.device, dtype=boxes.dtype)
        inside = (c.view(1, -1) < boxes[:, d + k : d + k + 1]) & (
            c.view(1, -1) + 1 > boxes[:, k : k + 1]
        )
        shape = [boxes.shape[0]] + [1] * d
        shape[1 + axis] = spatial[axis]
        mask = mask & inside.view(shape)
    return mask.any(0)


def ground_truth_masks(
    ground_truth: Sequence[Any], spatial: Sequence[int], device: Any = None
) -> Tensor:
    """Boolean masks ``(N, *S)`` from per-sample masks or boxes (see the module docstring).

    Raises:
        TypeError: for entries that are neither masks nor boxes.
        ValueError: for a wrong count, wrongly shaped masks/boxes, or an empty ground truth.
    """
    spatial = tuple(int(s) for s in spatial)
    d = len(spatial)
    if isinstance(ground_truth, Tensor) and ground_truth.dtype == torch.bool:
        gt = ground_truth.to(device)
        if gt.ndim == d + 2 and gt.shape[1] == 1:
            gt = gt[:, 0]
        if tuple(gt.shape[1:]) != spatial:
            raise ValueError(f"ground_truth masks must be (N, *{spatial}), got {tuple(gt.shape)}")
        masks = gt
    else:
        if isinstance(ground_truth, (str, bytes)) or not isinstance(ground_truth, Sequence):
            raise TypeError(
                "ground_truth must be a boolean tensor (N, *S) or a sequence of per-sample masks or "
                f"boxes, got {type(ground_truth).__name__}"
            )
        out = []
        for i, item in enumerate(ground_truth):
            if isinstance(item, Tensor) and item.dtype == torch.bool:
                m = item.to(device)
                m = m[0] if m.ndim == d + 1 and m.shape[0] == 1 else m
                if tuple(m.shape) != spatial:
                    raise ValueError(
                        f"ground_truth[{i}] mask must have shape {spatial}, got {tuple(m.shape)}"
                    )
                out.append(m)
                continue
            try:
                boxes = torch.as_tensor(item, dtype=torch.float64, device=device)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"ground_truth[{i}] must be a boolean mask or boxes [x0, y0, x1, y1], got {type(item).__name__}"
                ) from None
            if boxes.ndim == 1:
                boxes = boxes.view(1, -1)
            if boxes.ndim != 2 or boxes.shape[1] != 2 * d or boxes.shape[0] == 0:
                raise ValueError(
                    f"ground_truth[{i}] must hold boxes of {2 * d} numbers "
                    f"({'[x0, y0, x1, y1]' if d == 2 else '[x0, y0, z0, x1, y1, z1]'}), got shape {tuple(boxes.shape)}"
                )
            if bool((boxes[:, d:] < boxes[:, :d]).any()):
                raise ValueError(
                    f"ground_truth[{i}] has a box with an upper corner below its lower one"
                )
            out.append(_box_mask(boxes, spatial))
        masks = torch.stack(out) if out else torch.zeros((0, *spatial), dtype=torch.bool)
    empty = ~masks.flatten(1).any(1)
    if bool(empty.any()):
        raise ValueError(
            f"ground truth of sample(s) {empty.nonzero().flatten().tolist()} covers no pixel of the input"
        )
    return masks


def _gt_for(maps: Tensor, ground_truth: Any) -> Tensor:
    masks = ground_truth_masks(ground_truth, maps.shape[1:], device=maps.device)
    if masks.shape[0] != maps.shape[0]:
        raise ValueError(f"ground_truth has {masks.shape[0]} entries but maps has {maps.shape[0]}")
    return masks


@dataclass
class PointingResult:
    """Outcome of the pointing game.

    Attributes:
        hits: ``(N,)`` bool, one per (image, class) map.
        points: ``(N, d)`` the arg-max position of each map (index per spatial axis).
        accuracy: mean over classes of the per-class hit rate.
        per_class: class → hit rate (one entry ``-1`` when no classes were given).
    """

    hits: Tensor
    points: Tensor
    accuracy: float
    per_class: dict[int, float] = field(default_factory=dict)


@register_metric
class PointingGame(Metric):
    """Pointing game with tolerance ``τ`` pixels (default 15); higher is better.

    Args:
        tolerance: a point hits when its distance (in pixels) to the nearest ground-truth
            pixel is below ``tolerance`` (> 0; ``1`` needs the point inside the ground truth).
    """

    name = "pointing_game"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {"pointing_game": True}
    titles: ClassVar[dict[str, str]] = {"pointing_game": "Pointing game"}
    needs = frozenset({"maps", "explainer", "boxes"})
    OPTIONS = (
        Option(
            "tolerance",
            "float",
            15.0,
            "a point hits within this many pixels of the ground truth",
            low=0,
            low_open=True,
        ),
    )

    def __init__(self, tolerance: float = 15.0) -> None:
        self.tolerance = self.option("tolerance", tolerance)

    def score(self, context: MetricContext) -> MetricRecord:
        """Hit or miss per ground-truth class of the image (its map explains that class);
        the column is the image's hit rate."""
        per_class = {
            cls: {"hit": bool(self(context.maps_for(cls), [boxes]).hits[0])}
            for cls, boxes in sorted((context.boxes or {}).items())
        }
        hits = [entry["hit"] for entry in per_class.values()]
        rate = sum(hits) / len(hits) if hits else None
        return MetricRecord({"pointing_game": rate}, per_class=per_class)

    @classmethod
    def summarise(
        cls, column: str, values: list[Any], per_class: list[dict[str, Any]]
    ) -> list[float]:
        """The hit rate of each class over the images (the game's mean is over classes)."""
        hits: dict[int, list[bool]] = {}
        for entry in per_class:
            if "hit" in entry:
                hits.setdefault(entry["class"], []).append(entry["hit"])
        return [sum(h) / len(h) for h in hits.values()]

    def __call__(
        self, maps: Any, ground_truth: Any, classes: Sequence[int] | Tensor | None = None
    ) -> PointingResult:
        """Play the game for ``N`` maps against their ground truth.

        Args:
            maps: ``(N, 1, *S)`` or ``(N, *S)`` maps, each the explanation of one class.
            ground_truth: per map, a boolean mask or boxes (module docstring).
            classes: ``(N,)`` the class of each map (for the mean over classes); ``None``
                counts every map as one class.

        Raises:
            TypeError / ValueError: for invalid maps, ground truth or classes.
        """
        m = _check_map_batch(maps)
        masks = _gt_for(m, ground_truth)
        n, spatial = m.shape[0], m.shape[1:]
        flat_idx = m.flatten(1).argmax(1)
        points = torch.stack(torch.unravel_index(flat_idx, spatial), dim=1)  # (N, d)
        grids = torch.meshgrid(
            *[torch.arange(s, device=m.device, dtype=torch.float32) for s in spatial], indexing="ij"
        )
        dist2 = sum(
            (g.flatten().view(1, -1) - points[:, a : a + 1].float()) ** 2
            for a, g in enumerate(grids)
        )
        flat = m.flatten(1)
        pointed = flat.amax(1) > flat.amin(1)  # a flat map points nowhere: a miss
        hits = (masks.flatten(1) & (dist2 < self.tolerance**2)).any(1) & pointed
        if classes is None:
            rate = float(hits.float().mean())
            return PointingResult(hits, points, rate, {-1: rate})
        cls = torch.as_tensor(classes, device=m.device)
        if cls.shape != (n,) or cls.is_floating_point():
            raise ValueError(f"classes must be {n} integer class indices, got {classes!r}")
        per_class = {
            int(c): float(hits[cls == c].float().mean()) for c in torch.unique(cls).tolist()
        }
        accuracy = sum(per_class.values()) / len(per_class)
        return PointingResult(hits, points, accuracy, per_class)


@register_metric
class EnergyPointingGame(Metric):
    """Share of the map's energy inside the ground truth, per map ``(N,)``; higher is better."""

    name = "energy_pointing_game"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {"energy_pointing_game": True}
    titles: ClassVar[dict[str, str]] = {"energy_pointing_game": "Energy pointing"}
    needs = frozenset({"maps", "explainer", "boxes"})

    def score(self, context: MetricContext) -> MetricRecord:
        """The energy inside each ground-truth class's boxes; the column is their mean."""
        per_class = {
            cls: {"energy": float(self(context.maps_for(cls), [boxes])[0])}
            for cls, boxes in sorted((context.boxes or {}).items())
        }
        energies = [entry["energy"] for entry in per_class.values()]
        mean = sum(energies) / len(energies) if energies else None
        return MetricRecord({"energy_pointing_game": mean}, per_class=per_class)

    def __call__(self, maps: Any, ground_truth: Any) -> Tensor:
        """``Σ(s ⊙ g) / Σ s`` per map (``0`` for an all-zero map).

        Raises:
            TypeError / ValueError: for invalid maps (negative values included) or ground truth.
        """
        m = _check_map_batch(maps)
        if bool((m < 0).any()):
            raise ValueError(
                "maps must be non-negative for the energy pointing game (take abs() or clamp signed "
                "attributions first)"
            )
        masks = _gt_for(m, ground_truth)
        total = m.flatten(1).sum(1)
        inside = (m * masks).flatten(1).sum(1)
        ok = total > 0
        return (inside / total.where(ok, torch.ones_like(total))).where(ok, torch.zeros_like(total))
