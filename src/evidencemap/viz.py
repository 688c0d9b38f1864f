"""Maps into pictures: heat-map overlays, comparison grids and 3-D montages.

Rendering uses matplotlib's object API (:class:`~matplotlib.figure.Figure` with the Agg canvas),
never ``pyplot``, so no global figure state is created or leaked and no display is needed.
Every function returns an RGB :class:`PIL.Image.Image`; :func:`save_png` and
:func:`to_png_bytes` write it out. The core library never imports this module.

Heat maps are ``(H, W)`` or ``(1, H, W)`` (``(D, H, W)`` or ``(1, D, H, W)`` for volumes)
tensors or arrays with values in [0, 1], as the library's methods return them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from evidencemap.models.preprocess import to_rgb_image

__all__ = [
    "DISPLAY_PERCENTILE",
    "for_display",
    "grid",
    "montage",
    "overlay",
    "overlay_figure",
    "peak_voxel",
    "save_png",
    "to_png_bytes",
]

ImageLike = Image.Image | np.ndarray | Tensor
"""A PIL image, a uint8 array ``(H, W[, 1|3|4])`` or a tensor ``(3|1, H, W)``/``(H, W)``."""
MapLike = Tensor | np.ndarray
"""A heat map with values in [0, 1]."""

_DPI = 100
_PANEL_INCHES = 3.2  # side of one figure panel
_COLORBAR_INCHES = 0.9  # width the shared colour bar adds
_MAX_SIDE = 1024  # figures shrink photos to at most this many pixels a side before blending
_RANGE_SLACK = 1e-3  # heat values this far outside [0, 1] are clipped; further is an error
DISPLAY_PERCENTILE = 99.5
"""Pixel-level maps are shown saturated at this percentile of their values (see :func:`for_display`)."""


# --------------------------------------------------------------------------- inputs


def for_display(
    maps: Tensor, raw: Tensor | Sequence[Tensor] | None, percentile: float = DISPLAY_PERCENTILE
) -> Tensor:
    """The maps ``(N, 1, *S)`` as they are best coloured.

    Maps computed at the resolution of the input (saliency, guided backprop, Integrated
    Gradients, SmoothGrad, Guided Grad-CAM: ``raw`` has the maps' spatial shape) are heavy-tailed:
    a few pixels carry the maximum and a linear colour scale shows almost nothing. Those are
    saturated per sample, ``min(1, m / q)`` with ``q`` the ``percentile``-th percentile of the
    sample's values (left as they are where ``q`` is 0, i.e. almost all of the map is 0). Maps
    upsampled from a layer are returned unchanged, and so are maps equal to their ``raw``
    (FGVis: the mask itself, whose values are absolute; stretching a nearly flat mask would
    show structure that is not there). Only pictures use this; the saved maps and every number
    stay the method's own.

    Args:
        maps: ``(N, 1, *S)`` maps in [0, 1].
        raw: the explanation's ``raw`` (a tensor or one per layer) or ``None``.
        percentile: in (0, 100].

    Returns:
        ``(N, 1, *S)`` maps in [0, 1].

    Raises:
        ValueError: for a percentile outside (0, 100].
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not isinstance(raw, Tensor) or raw.shape[2:] != maps.shape[2:] or percentile == 100:
        return maps
    if raw.shape == maps.shape and torch.equal(raw.to(maps.device, maps.dtype), maps):
        return maps
    flat = maps.flatten(1)
    k = max(1, min(flat.shape[1], round(percentile / 100 * flat.shape[1])))
    q = flat.kthvalue(k, dim=1, keepdim=True).values
    ok = q > 0
    shown = (flat / q.where(ok, q.new_ones(()))).clamp(max=1)
    return shown.where(ok, flat).view_as(maps)


def _as_rgb(image: ImageLike) -> Image.Image:
    """Any accepted image form as an RGB PIL image.

    Tensors are channel-first ``(3, H, W)``/``(1, H, W)`` or ``(H, W)``; uint8 as is, floats
    taken to lie in [0, 1].
    """
    if isinstance(image, Tensor):
        pixels = image.detach().cpu()
        if pixels.ndim == 3 and pixels.shape[0] in (1, 3):
            pixels = pixels.permute(1, 2, 0)
        elif pixels.ndim != 2:
            raise ValueError(
                f"image tensor must be (3, H, W), (1, H, W) or (H, W), got {tuple(image.shape)}"
            )
        if pixels.dtype != torch.uint8:
            pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return to_rgb_image(pixels.numpy())
    return to_rgb_image(image)


def _as_map(heatmap: MapLike, ndim: int) -> Tensor:
    """``heatmap`` as a float32 CPU tensor with ``ndim`` axes, checked to lie in [0, 1]."""
    heat = heatmap.detach().cpu() if isinstance(heatmap, Tensor) else torch.as_tensor(heatmap)
    if heat.ndim == ndim + 1 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != ndim:
        expected = "(H, W) or (1, H, W)" if ndim == 2 else "(D, H, W) or (1, D, H, W)"
        raise ValueError(f"heatmap must be {expected}, got {tuple(heat.shape)}")
    if heat.numel() == 0:
        raise ValueError(f"heatmap is empty: {tuple(heat.shape)}")
    heat = heat.to(torch.float32)
    if not bool(torch.isfinite(heat).all()):
        raise ValueError("heatmap holds NaN or infinite values")
    low, high = float(heat.min()), float(heat.max())
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(
            f"heatmap values must lie in [0, 1] (normalise the map first), got [{low:g}, {high:g}]"
        )
    return heat.clamp(0, 1)


def _resize(heat: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (2-D) or trilinear (3-D) resize, ``align_corners=False``; same size unchanged."""
    if tuple(heat.shape) == tuple(size):
        return heat
    mode = "bilinear" if heat.ndim == 2 else "trilinear"
    resized = F.interpolate(heat[None, None], size=tuple(size), mode=mode, align_corners=False)
    return resized[0, 0].clamp(0, 1)


def _colormap(cmap: str | Colormap) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return colormaps[cmap]
    except KeyError as err:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from err


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return float(alpha)


def _blend(rgb: np.ndarray, heat: Tensor, cmap: Colormap, alpha: float) -> np.ndarray:
    """``(1 − alpha)·rgb + alpha·cmap(heat)`` as uint8 ``(H, W, 3)``."""
    colours = cmap(heat.numpy())[..., :3] * 255.0
    mixed = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _shrink(image: Image.Image, max_side: int = _MAX_SIDE) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


Region = tuple[float, float, float, float]
"""``(left, top, right, bottom)`` in image pixels: the part of a photo a model saw."""

_DIM_WEIGHT = 0.35  # outside a region, pixels keep this weight and the rest is washed to white


def _check_region(region: Region | None, width: int, height: int) -> Region | None:
    if region is None:
        return None
    if len(region) != 4:
        raise ValueError(f"region must be (left, top, right, bottom), got {region}")
    left, top, right, bottom = (float(v) for v in region)
    if not (0 <= left < right <= width + 0.5 and 0 <= top < bottom <= height + 0.5):
        raise ValueError(
            f"region {region} must be a non-empty box inside the {width}×{height} image"
        )
    return left, top, right, bottom


def _scale_region(region: Region | None, scale: float) -> Region | None:
    return None if region is None else tuple(v * scale for v in region)  # type: ignore[return-value]


def _outside(region: Region, height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)``: pixels whose centres lie outside ``region``."""
    left, top, right, bottom = region
    cols = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None]
    return ~inside


def _dim_outside(blended: np.ndarray, rgb: np.ndarray, region: Region | None) -> np.ndarray:
    """Outside ``region``: the plain photo washed towards white (no heat colours)."""
    if region is None:
        return blended
    mask = _outside(region, *rgb.shape[:2])
    washed = _DIM_WEIGHT * rgb.astype(np.float64) + (1 - _DIM_WEIGHT) * 255.0
    out = blended.copy()
    out[mask] = np.clip(np.rint(washed[mask]), 0, 255).astype(np.uint8)
    return out


def _outline(axes: Axes, region: Region | None) -> None:
    if region is None:
        return
    from matplotlib.patches import Rectangle

    left, top, right, bottom = region
    # pixel centres sit at integer coordinates in imshow, so edges are at −0.5
    axes.add_patch(
        Rectangle(
            (left - 0.5, top - 0.5),
            right - left,
            bottom - top,
            fill=False,
            edgecolor="black",
            linestyle="--",
            linewidth=0.8,
        )
    )


# --------------------------------------------------------------------------- rendering


def _render(figure: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def _figure(panels: int, aspect: float, *, colorbar: bool, title: str | None) -> Figure:
    """A figure for ``panels`` side-by-side panels of height/width ``aspect`` (width linear in
    the number of panels)."""
    panel_height = min(max(_PANEL_INCHES * aspect, 1.6), 2.5 * _PANEL_INCHES)
    width = panels * _PANEL_INCHES + (_COLORBAR_INCHES if colorbar else 0.0)
    height = panel_height + 0.45 + (0.4 if title else 0.0)
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained", facecolor="white")
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def _show(axes: Axes, pixels: np.ndarray, label: str, aspect: float = 1.0) -> None:
    axes.imshow(pixels, aspect=aspect, interpolation="antialiased")
    axes.set_title(label, fontsize=9)
    axes.set_axis_off()


def _colorbar(figure: Figure, axes: Sequence[Axes] | Axes, cmap: Colormap) -> None:
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    bar = figure.colorbar(mappable, ax=axes, fraction=0.05, shrink=0.9)
    bar.set_label("evidence")


def overlay(
    image: ImageLike,
    heatmap: MapLike,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    region: Region | None = None,
) -> Image.Image:
    """Blend a coloured heat map over a photo: ``(1 − alpha)·image + alpha·cmap(heatmap)``.

    A heat map of another size than the image is resized bilinearly to the image size.

    Args:
        image: PIL image, uint8 array ``(H, W, 3)`` (also ``(H, W)``, RGBA) or image tensor.
        heatmap: ``(H', W')`` or ``(1, H', W')`` tensor or array with values in [0, 1] (values
            within 1e-3 outside are clipped).
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        region: optional ``(left, top, right, bottom)`` box in image pixels, the part of the
            photo the model saw (e.g. its centre crop): heat colours are drawn only inside it;
            outside, the photo is washed towards white, since nothing was measured there.

    Returns:
        RGB image of the image's size.

    Raises:
        ValueError: for a heat map of the wrong shape, with values outside [0, 1] or non-finite,
            an unknown colormap, ``alpha`` outside [0, 1] or a region outside the image.
    """
    rgb = _as_rgb(image)
    box = _check_region(region, rgb.width, rgb.height)
    heat = _resize(_as_map(heatmap, 2), (rgb.height, rgb.width))
    pixels = np.asarray(rgb)
    blended = _blend(pixels, heat, _colormap(cmap), _check_alpha(alpha))
    return Image.fromarray(_dim_outside(blended, pixels, box))


def overlay_figure(
    image: ImageLike,
    heatmap: MapLike,
    title: str | None = None,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    colorbar: bool = True,
    region: Region | None = None,
) -> Image.Image:
    """The :func:`overlay` drawn as a figure, with a colour bar labelled "evidence".

    Args:
        image: as for :func:`overlay`; photos larger than 1024 px a side are shrunk first.
        heatmap: as for :func:`overlay`.
        title: optional title above the picture.
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        colorbar: whether to draw the colour bar.
        region: as for :func:`overlay`, in the pixels of ``image``; outlined with a dashed box.

    Returns:
        The rendered figure as an RGB image.

    Raises:
        ValueError: as for :func:`overlay`.
    """
    original = _as_rgb(image)
    box = _check_region(region, original.width, original.height)
    rgb = _shrink(original)
    box = _scale_region(box, rgb.width / original.width)
    colours = _colormap(cmap)
    blended = overlay(rgb, heatmap, colours, alpha, region=box)
    figure = _figure(1, rgb.height / rgb.width, colorbar=colorbar, title=None)
    axes = figure.add_subplot()
    _show(axes, np.asarray(blended), title or "")
    _outline(axes, box)
    if colorbar:
        _colorbar(figure, axes, colours)
    return _render(figure)


def grid(
    image: ImageLike,
    panels: Sequence[tuple[str, MapLike]],
    title: str | None = None,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    extra_images: Sequence[tuple[str, ImageLike]] | None = None,
    region: Region | None = None,
) -> Image.Image:
    """Compare maps on one photo: the original, one overlay per map, then extra plain images.

    One row of equal panels — "original", then each ``(title, heatmap)`` of ``panels`` as an
    overlay under its title (e.g. ``"gradcam — tiger cat 0.39"``), then each
    ``(title, image)`` of ``extra_images`` (e.g. an FGVis explanation image) — and one shared
    colour bar when there is at least one map. The figure's width grows linearly with the
    number of panels.

    Args:
        image: the photo, as for :func:`overlay`.
        panels: ``(title, heatmap)`` pairs; heat maps as for :func:`overlay`.
        title: optional title above the row.
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        extra_images: ``(title, image)`` pairs shown as they are.
        region: as for :func:`overlay`, in the pixels of ``image``; outlined with a dashed box
            on the original and on every overlay.

    Returns:
        The rendered figure as an RGB image.

    Raises:
        ValueError: as for :func:`overlay`.
    """
    original = _as_rgb(image)
    box = _check_region(region, original.width, original.height)
    rgb = _shrink(original)
    box = _scale_region(box, rgb.width / original.width)
    colours = _colormap(cmap)
    shown = [("original", np.asarray(rgb))]
    shown += [
        (label, np.asarray(overlay(rgb, heat, colours, alpha, region=box)))
        for label, heat in panels
    ]
    shown += [(label, np.asarray(_shrink(_as_rgb(extra)))) for label, extra in extra_images or []]
    figure = _figure(len(shown), rgb.height / rgb.width, colorbar=bool(panels), title=title)
    axes = figure.subplots(1, len(shown), squeeze=False)[0]
    for index, (ax, (label, pixels)) in enumerate(zip(axes, shown, strict=True)):
        _show(ax, pixels, label)
        if index <= len(panels):
            _outline(ax, box)
    if panels:
        _colorbar(figure, list(axes), colours)
    return _render(figure)


def peak_voxel(heatmap: MapLike) -> tuple[int, int, int]:
    """Index ``(d, h, w)`` of the largest value of a 3-D heat map (the first, on ties).

    A flat map (all values equal) has no peak: its centre voxel is returned.

    Args:
        heatmap: ``(D, H, W)`` or ``(1, D, H, W)`` tensor or array with values in [0, 1].

    Returns:
        The voxel index, where :func:`montage` cuts its three slices.

    Raises:
        ValueError: as for :func:`montage`.
    """
    heat = _as_map(heatmap, 3)
    if float(heat.max()) == float(heat.min()):
        depth, height, width = heat.shape
        return depth // 2, height // 2, width // 2
    index = np.unravel_index(int(heat.argmax()), tuple(heat.shape))
    return int(index[0]), int(index[1]), int(index[2])


def montage(
    volume: MapLike,
    heatmap: MapLike,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    spacing: Sequence[float] | None = None,
    colorbar: bool = True,
) -> Image.Image:
    """Axial, coronal and sagittal slices through a 3-D heat map's peak, overlaid on the volume.

    The slices are ``volume[d]`` (axial), ``volume[:, h]`` (coronal) and ``volume[:, :, w]``
    (sagittal) at ``(d, h, w) =`` :func:`peak_voxel` of the heat map — the axis convention of
    :func:`evidencemap.io.load_volume`. The volume is min-max scaled to grey for display (a
    constant volume shows black); a heat map of another size is resized trilinearly to it.

    Args:
        volume: ``(D, H, W)`` or ``(1, D, H, W)`` tensor or array, any real range.
        heatmap: ``(D', H', W')`` or ``(1, D', H', W')`` with values in [0, 1].
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        title: optional title above the panels.
        spacing: optional voxel size along ``(D, H, W)``, so anisotropic voxels keep their
            true proportions.
        colorbar: whether to draw the colour bar labelled "evidence".

    Returns:
        The rendered figure as an RGB image.

    Raises:
        ValueError: for shapes other than those above, non-finite values, heat values outside
            [0, 1], non-positive spacing, an unknown colormap or ``alpha`` outside [0, 1].
    """
    grey = volume.detach().cpu() if isinstance(volume, Tensor) else torch.as_tensor(volume)
    if grey.ndim == 4 and grey.shape[0] == 1:
        grey = grey[0]
    if grey.ndim != 3 or grey.numel() == 0:
        raise ValueError(f"volume must be (D, H, W) or (1, D, H, W), got {tuple(grey.shape)}")
    grey = grey.to(torch.float64)
    if not bool(torch.isfinite(grey).all()):
        raise ValueError("volume holds NaN or infinite values")
    low, high = float(grey.min()), float(grey.max())
    grey = (grey - low) / (high - low) if high > low else torch.zeros_like(grey)
    grey_rgb = (grey * 255).round().to(torch.uint8).numpy()[..., None].repeat(3, axis=-1)

    heat = _resize(_as_map(heatmap, 3), tuple(grey.shape))
    d, h, w = peak_voxel(heat)
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (D, H, W), got {spacing}")
    dz, dy, dx = spacing
    colours, weight = _colormap(cmap), _check_alpha(alpha)
    views = [
        (f"axial  d={d}", grey_rgb[d], heat[d], dy / dx),
        (f"coronal  h={h}", grey_rgb[:, h], heat[:, h], dz / dx),
        (f"sagittal  w={w}", grey_rgb[:, :, w], heat[:, :, w], dz / dy),
    ]
    figure = _figure(3, 1.0, colorbar=colorbar, title=title)
    axes = figure.subplots(1, 3)
    for ax, (label, pixels, heat_slice, aspect) in zip(axes, views, strict=True):
        _show(ax, _blend(pixels, heat_slice, colours, weight), label, aspect)
    if colorbar:
        _colorbar(figure, list(axes), colours)
    return _render(figure)


# --------------------------------------------------------------------------- output


def save_png(image: ImageLike, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as a PNG file, creating the parent folder when missing.

    Args:
        image: PIL image, uint8 array or image tensor.
        path: target file (written as PNG whatever its suffix).

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _as_png_ready(image).save(out, format="PNG")
    return out


def to_png_bytes(image: ImageLike) -> bytes:
    """``image`` encoded as PNG bytes (e.g. for an HTTP response).

    Args:
        image: PIL image, uint8 array or image tensor.

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    _as_png_ready(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _as_png_ready(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image) and image.mode in ("RGB", "RGBA", "L"):
        return image
    return _as_rgb(image)
