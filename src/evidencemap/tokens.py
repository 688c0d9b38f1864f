"""Token sequences and channels-last outputs as ``(N, C, *grid)`` activations.

Vision transformers produce ``(N, T, C)`` token sequences at their layers: ``r`` leading prefix
tokens (a CLS token, a distillation token, registers) followed by ``h·w`` patch tokens in
row-major order (``d·h·w`` for a video or volume transformer). Swin-style models produce
channels-last grids ``(N, H, W, C)``. Every layer method explains ``(N, C, *grid)``; this module
converts between the two:

``tokens_to_grid(t)[n, c, i, j] = t[n, r + i·w + j, c]`` and
``channels_last_to_grid(t)[n, c, i, j] = t[n, i, j, c]``.

Both are linear index maps, so the gradient ``∂y/∂t`` taken w.r.t. the layer's real output and
converted the same way is exactly ``∂y/∂grid`` (the prefix tokens' gradients are dropped with
them).

The grid is inferred from the input's spatial shape ``S`` and the token count ``T``: the number of
prefix tokens is the smallest ``r ≥ 0`` for which ``T − r`` patch tokens form a grid
``g = S / p`` for one patch size ``p`` (every axis divided by the same factor, i.e. the largest
grid with the inputs' aspect ratio). :class:`Tokens` names the layout explicitly instead:
``layer=Tokens("blocks.3.norm1", prefix=1, grid=(14, 14))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "GridLayout",
    "Tokens",
    "channels_last_to_grid",
    "infer_grid",
    "resolve_layout",
    "to_grid",
    "tokens_to_grid",
]

LAYOUTS = ("auto", "channels_first", "tokens", "channels_last")
"""How a layer's output is laid out: ``channels_first`` ``(N, C, *grid)`` (convolutions),
``tokens`` ``(N, T, C)``, ``channels_last`` ``(N, *grid, C)``; ``auto`` detects it."""

MAX_PREFIX = 64
"""The most leading prefix tokens the detection considers."""


@dataclass(frozen=True)
class GridLayout:
    """A resolved layout: ``kind`` (``channels_first`` / ``tokens`` / ``channels_last``), the
    number of ``prefix`` tokens dropped and the ``grid`` shape."""

    kind: str
    prefix: int
    grid: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        """JSON-safe form (reported in ``Explanation.extras["tokens"]``)."""
        return {"layout": self.kind, "prefix": self.prefix, "grid": list(self.grid)}


@dataclass(frozen=True)
class Tokens:
    """A layer together with the layout of its output, for ``layer=``.

    Args:
        layer: a module or a dotted name.
        layout: one of :data:`LAYOUTS` (default ``"auto"``).
        prefix: leading prefix tokens (``None``: detected).
        grid: the grid shape (``None``: inferred from the input's shape).

    Raises:
        TypeError / ValueError: for a layout, prefix or grid of the wrong kind.
    """

    layer: str | nn.Module
    layout: str = "auto"
    prefix: int | None = None
    grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Tokens layout must be one of {LAYOUTS}, got {self.layout!r}")
        prefix = self.prefix
        if prefix is not None and (
            isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0
        ):
            raise TypeError(f"Tokens prefix must be an int >= 0 or None, got {prefix!r}")
        if self.grid is not None:
            grid = tuple(self.grid) if isinstance(self.grid, (tuple, list)) else None
            if not grid or not all(
                isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid
            ):
                raise TypeError(f"Tokens grid must be a tuple of positive ints, got {self.grid!r}")
            object.__setattr__(self, "grid", grid)

    def describe(self) -> dict[str, Any]:
        """The explicit parts of the layout."""
        return {
            "layout": self.layout,
            "prefix": self.prefix,
            "grid": None if self.grid is None else list(self.grid),
        }


def infer_grid(tokens: int, spatial: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """``(prefix, grid)`` for ``tokens`` tokens over inputs of spatial shape ``spatial``.

    The smallest prefix ``r`` (at most :data:`MAX_PREFIX`) such that ``tokens − r = Π_i S_i / p^d``
    with ``S_i / p`` an integer on every axis for one (possibly fractional) patch size ``p``;
    ``None`` when there is none.
    """
    d = len(spatial)
    total = math.prod(spatial)
    for prefix in range(min(MAX_PREFIX, tokens - 1) + 1):
        n = tokens - prefix
        scale = (total / n) ** (1.0 / d)
        grid = tuple(round(s / scale) for s in spatial)
        if math.prod(grid) == n and all(
            g > 0 and abs(g * scale - s) < 1e-6 * s for g, s in zip(grid, spatial, strict=True)
        ):
            return prefix, grid
    return None


def _matches_aspect(shape: tuple[int, ...], spatial: tuple[int, ...]) -> bool:
    """``shape ≈ spatial / p`` for one factor ``p``: the per-axis factors within 25 % of each
    other (strided layers round up or down)."""
    if len(shape) != len(spatial) or not shape or any(s <= 0 for s in shape):
        return False
    ratios = [s / g for s, g in zip(spatial, shape, strict=True)]
    return max(ratios) <= 1.25 * min(ratios)


def resolve_layout(
    shape: tuple[int, ...], input_shape: tuple[int, ...], spec: Tokens | None = None
) -> GridLayout | None:
    """The layout of a layer output of ``shape`` for inputs of ``input_shape`` ``(N, C, *S)``.

    Detection (``spec`` ``None`` or ``layout="auto"``): an output of the inputs' rank is
    channels-first when its axes after the channel match the inputs' aspect ratio, else
    channels-last when its middle axes do; a 3-axis output of 2-D… inputs (or of any inputs, when
    the rank differs) is a token sequence whose grid :func:`infer_grid` finds. Returns ``None``
    when the output is none of these (e.g. ``(N, classes)``).
    """
    spatial = tuple(input_shape[2:])
    ndim = len(input_shape)
    kind = "auto" if spec is None else spec.layout
    prefix = None if spec is None else spec.prefix
    grid = None if spec is None else spec.grid
    if kind == "auto":
        if len(shape) == ndim and _matches_aspect(tuple(shape[2:]), spatial):
            kind = "channels_first"
        elif (
            len(shape) == ndim
            and shape[-1] > shape[1]
            and _matches_aspect(tuple(shape[1:-1]), spatial)
        ):
            kind = "channels_last"
        elif len(shape) == 3:
            kind = "tokens"
        elif len(shape) == ndim and any(s > 1 for s in shape[2:]):
            kind = "channels_first"  # a spatial output of another aspect ratio
        else:
            return None
    if kind == "channels_first":
        return GridLayout(kind, 0, tuple(shape[2:])) if len(shape) >= 3 else None
    if kind == "channels_last":
        return GridLayout(kind, 0, tuple(shape[1:-1])) if len(shape) >= 3 else None
    if len(shape) != 3:
        return None
    tokens = shape[1]
    if grid is not None:
        prefix = tokens - math.prod(grid) if prefix is None else prefix
        if prefix < 0 or prefix + math.prod(grid) != tokens:
            raise ValueError(
                f"layer output has {tokens} tokens, which is not prefix {prefix} + grid "
                f"{grid} ({math.prod(grid)} tokens)"
            )
        return GridLayout("tokens", prefix, tuple(grid))
    if prefix is not None:
        found = infer_grid(tokens - prefix, spatial)
        if found is None or found[0] != 0:
            raise ValueError(
                f"{tokens - prefix} patch tokens (after {prefix} prefix tokens) form no grid with "
                f"the aspect ratio of the inputs {spatial}; pass grid= explicitly"
            )
        return GridLayout("tokens", prefix, found[1])
    found = infer_grid(tokens, spatial)
    if found is None:
        return None
    return GridLayout("tokens", found[0], found[1])


def tokens_to_grid(t: Tensor, prefix: int, grid: tuple[int, ...]) -> Tensor:
    """``(N, T, C)`` → ``(N, C, *grid)``, dropping the ``prefix`` leading tokens."""
    n, _t, c = t.shape
    return t[:, prefix:, :].transpose(1, 2).reshape(n, c, *grid)


def channels_last_to_grid(t: Tensor) -> Tensor:
    """``(N, *grid, C)`` → ``(N, C, *grid)``."""
    return t.movedim(-1, 1)


def to_grid(t: Tensor, layout: GridLayout) -> Tensor:
    """``t`` (a layer output or its gradient) as ``(N, C, *grid)`` under ``layout``."""
    if layout.kind == "tokens":
        return tokens_to_grid(t, layout.prefix, layout.grid)
    if layout.kind == "channels_last":
        return channels_last_to_grid(t)
    return t
