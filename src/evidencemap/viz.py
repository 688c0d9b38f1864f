"""Maps into pictures: heat-map overlays, comparison grids, 3-D montages, figures for papers and
notebooks.

Rendering uses matplotlib's object API (:class:`~matplotlib.figure.Figure` with the Agg canvas),
never ``pyplot``, so no global figure state is created or leaked and no display is needed.
The ``*_plot`` builders return a matplotlib :class:`~matplotlib.figure.Figure` (save it as PNG,
PDF or SVG with :func:`save_figure`, at any ``dpi``); :func:`overlay_figure`, :func:`grid` and
:func:`montage` return the same figures rendered as RGB :class:`PIL.Image.Image`;
:func:`save_png` and :func:`to_png_bytes` write those out, :func:`save_map` writes a bare map
(PNG, or 16-bit TIFF of its values). :func:`figure`, :func:`plot`, :func:`show` and
:func:`save` draw an :class:`~evidencemap.explanation.Explanation` in one call, as the command
line does (the photo with the model's crop outlined; volumes as three slices); the
explanation's ``plot``/``show``/``_repr_png_`` call them. The core library never imports
this module.

Heat maps are ``(H, W)`` or ``(1, H, W)`` (``(D, H, W)`` or ``(1, D, H, W)`` for volumes)
tensors or arrays with values in [0, 1], as the library's methods return them, or any real
values with a colour scale ``vmin``/``vmax``.

Colours. The default colour map is :data:`DEFAULT_CMAP` (``"inferno"``): perceptually uniform
(equal steps in value are equal steps in perceived lightness, and lightness rises monotonically
from black to pale yellow), so it shows no edges that are not in the map, reads the same in
greyscale print and to readers with red-green colour blindness, and its bright end marks
"most evidence" on a photo. ``jet``, the former default, has bands of fast and slow lightness
change (cyan and yellow look like edges) and is not monotonic in lightness. Signed maps
(Integrated Gradients, ``abs=False`` saliency, ``relu=False`` CAMs, counterfactual maps) use
the diverging :data:`SIGNED_CMAP` (``"RdBu_r"``: red raises the target's score, blue lowers it,
white is 0) on a symmetric scale ``[−m, m]`` (:func:`is_signed`, :func:`signed_values`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

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

from evidencemap.explanation import Explanation, effective_options
from evidencemap.maps import FLAT_EPS, upsample
from evidencemap.models.preprocess import to_rgb_image

__all__ = [
    "DEFAULT_CMAP",
    "DISPLAY_PERCENTILE",
    "FIGURE_FORMATS",
    "MAP_FORMATS",
    "SIGNED_CMAP",
    "Look",
    "figure",
    "for_display",
    "grid",
    "grid_plot",
    "is_signed",
    "look",
    "montage",
    "montage_plot",
    "overlay",
    "overlay_figure",
    "overlay_plot",
    "peak_voxel",
    "plot",
    "render",
    "repr_png",
    "save",
    "save_figure",
    "save_map",
    "save_png",
    "show",
    "signed_values",
    "symmetric_scale",
    "to_png_bytes",
]

ImageLike = Image.Image | np.ndarray | Tensor
"""A PIL image, a uint8 array ``(H, W[, 1|3|4])`` or a tensor ``(3|1, H, W)``/``(H, W)``."""
MapLike = Tensor | np.ndarray
"""A heat map with values in [0, 1] (or any real values with ``vmin``/``vmax``)."""

DEFAULT_CMAP = "inferno"
"""The colour map of unsigned maps: perceptually uniform (see the module docstring)."""
SIGNED_CMAP = "RdBu_r"
"""The colour map of signed maps: diverging, white at 0, red positive, blue negative."""
FIGURE_FORMATS = ("png", "pdf", "svg")
"""What :func:`save_figure` writes (PDF and SVG keep text and lines as vectors)."""
MAP_FORMATS = ("png", "tiff")
"""What :func:`save_map` writes: a coloured PNG, or a 16-bit TIFF of the map's values."""

_DPI = 100
_PANEL_INCHES = 3.2  # side of one figure panel
_COLORBAR_INCHES = 0.9  # width the shared colour bar adds
_MAX_SIDE = 1024  # figures shrink photos to at most this many pixels a side before blending
_RANGE_SLACK = 1e-3  # heat values this far outside [0, 1] are clipped; further is an error
_UINT16 = 65535
_REPR_SAMPLES = 8  # most maps a notebook's rich display of a batch shows
DISPLAY_PERCENTILE = 99.5
"""Pixel-level maps are shown saturated at this percentile of their values (see :func:`for_display`)."""
SIGNED_LABEL = "− against · for the target +"
EVIDENCE_LABEL = "evidence"


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


def _check_scale(vmin: float | None, vmax: float | None) -> tuple[float, float] | None:
    """``None`` (maps in [0, 1]) or a finite ``(vmin, vmax)`` with ``vmin < vmax``."""
    if vmin is None and vmax is None:
        return None
    if vmin is None or vmax is None:
        raise ValueError(f"give both vmin and vmax (or neither), got vmin={vmin}, vmax={vmax}")
    low, high = float(vmin), float(vmax)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"vmin must be below vmax, both finite, got vmin={vmin}, vmax={vmax}")
    return low, high


def _as_map(heatmap: MapLike, ndim: int, scale: tuple[float, float] | None = None) -> Tensor:
    """``heatmap`` as a float32 CPU tensor with ``ndim`` axes of colour positions in [0, 1].

    Without ``scale`` the values must lie in [0, 1] (1e-3 slack); with ``scale = (vmin, vmax)``
    any finite values are taken, clipped to the scale and mapped linearly onto [0, 1].
    """
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
    if scale is not None:
        low, high = scale
        return ((heat.double().clamp(low, high) - low) / (high - low)).float()
    low, high = float(heat.min()), float(heat.max())
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(
            f"heatmap values must lie in [0, 1] (normalise the map first, or give vmin and "
            f"vmax), got [{low:g}, {high:g}]"
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


def render(figure: Figure) -> Image.Image:
    """A matplotlib figure rasterised (Agg, at the figure's dpi) as an RGB image."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


P = ParamSpec("P")


def _rendered(builder: Callable[P, Figure], name: str) -> Callable[P, Image.Image]:
    """``builder``'s figure rendered as an RGB image, under ``name``."""

    def rendered(*args: P.args, **kwargs: P.kwargs) -> Image.Image:
        return render(builder(*args, **kwargs))

    rendered.__name__ = rendered.__qualname__ = name
    rendered.__doc__ = (
        f"The figure of :func:`{builder.__name__}` (same arguments) rendered as an RGB image."
    )
    return rendered


def _check_dpi(dpi: float) -> float:
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 2400:
        raise ValueError(f"dpi must be a number in [10, 2400], got {dpi!r}")
    return float(dpi)


def _check_figsize(figsize: Sequence[float] | None) -> tuple[float, float] | None:
    if figsize is None:
        return None
    sizes = tuple(figsize)
    if len(sizes) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.5 <= v <= 100 for v in sizes
    ):
        raise ValueError(
            f"figsize must be (width, height) in inches, each in [0.5, 100], got {figsize}"
        )
    return float(sizes[0]), float(sizes[1])


def _figure(
    panels: int,
    aspect: float,
    *,
    colorbar: bool,
    title: str | None,
    dpi: float = _DPI,
    figsize: Sequence[float] | None = None,
) -> Figure:
    """A figure for ``panels`` side-by-side panels of height/width ``aspect`` (width linear in
    the number of panels), or of ``figsize`` inches when given."""
    size = _check_figsize(figsize)
    if size is None:
        panel_height = min(max(_PANEL_INCHES * aspect, 1.6), 2.5 * _PANEL_INCHES)
        width = panels * _PANEL_INCHES + (_COLORBAR_INCHES if colorbar else 0.0)
        size = (width, panel_height + 0.45 + (0.4 if title else 0.0))
    figure = Figure(figsize=size, dpi=_check_dpi(dpi), layout="constrained", facecolor="white")
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def _show(axes: Axes, pixels: np.ndarray, label: str, aspect: float = 1.0) -> None:
    axes.imshow(pixels, aspect=aspect, interpolation="antialiased")
    axes.set_title(label, fontsize=9)
    axes.set_axis_off()


def _colorbar(
    figure: Figure,
    axes: Sequence[Axes] | Axes,
    cmap: Colormap,
    scale: tuple[float, float] | None = None,
    label: str | None = None,
) -> None:
    low, high = scale if scale is not None else (0.0, 1.0)
    mappable = ScalarMappable(norm=Normalize(low, high), cmap=cmap)
    bar = figure.colorbar(mappable, ax=axes, fraction=0.05, shrink=0.9)
    bar.set_label(label or EVIDENCE_LABEL)


def overlay(
    image: ImageLike,
    heatmap: MapLike,
    cmap: str | Colormap = DEFAULT_CMAP,
    alpha: float = 0.5,
    region: Region | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """Blend a coloured heat map over a photo: ``(1 − alpha)·image + alpha·cmap(heatmap)``.

    A heat map of another size than the image is resized bilinearly to the image size.

    Args:
        image: PIL image, uint8 array ``(H, W, 3)`` (also ``(H, W)``, RGBA) or image tensor.
        heatmap: ``(H', W')`` or ``(1, H', W')`` tensor or array with values in [0, 1] (values
            within 1e-3 outside are clipped), or any finite values with ``vmin``/``vmax``.
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        region: optional ``(left, top, right, bottom)`` box in image pixels, the part of the
            photo the model saw (e.g. its centre crop): heat colours are drawn only inside it;
            outside, the photo is washed towards white, since nothing was measured there.
        vmin, vmax: the values at the two ends of the colour map (both or neither; e.g.
            ``−m, m`` for a signed map); values beyond are clipped.

    Returns:
        RGB image of the image's size.

    Raises:
        ValueError: for a heat map of the wrong shape, with values outside [0, 1] (without a
            scale) or non-finite, an unknown colormap, ``alpha`` outside [0, 1], a bad scale or
            a region outside the image.
    """
    rgb = _as_rgb(image)
    box = _check_region(region, rgb.width, rgb.height)
    heat = _resize(_as_map(heatmap, 2, _check_scale(vmin, vmax)), (rgb.height, rgb.width))
    pixels = np.asarray(rgb)
    blended = _blend(pixels, heat, _colormap(cmap), _check_alpha(alpha))
    return Image.fromarray(_dim_outside(blended, pixels, box))


def overlay_plot(
    image: ImageLike,
    heatmap: MapLike,
    title: str | None = None,
    cmap: str | Colormap = DEFAULT_CMAP,
    alpha: float = 0.5,
    colorbar: bool = True,
    region: Region | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str | None = None,
    dpi: float = _DPI,
    figsize: Sequence[float] | None = None,
) -> Figure:
    """The :func:`overlay` drawn as a figure, with a colour bar (labelled "evidence" unless
    ``colorbar_label`` says otherwise).

    Args:
        image: as for :func:`overlay`; photos larger than 1024 px a side are shrunk first.
        heatmap: as for :func:`overlay`.
        title: optional title above the picture.
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        colorbar: whether to draw the colour bar.
        region: as for :func:`overlay`, in the pixels of ``image``; outlined with a dashed box.
        vmin, vmax: the colour scale, as for :func:`overlay` (the bar shows it).
        colorbar_label: the bar's label.
        dpi: pixels per inch of the rendered figure (100: one panel is 320 px wide).
        figsize: ``(width, height)`` in inches instead of the automatic size.

    Returns:
        The figure (:func:`overlay_figure` renders it; :func:`save_figure` saves it).

    Raises:
        ValueError: as for :func:`overlay`, and for a bad ``dpi`` or ``figsize``.
    """
    original = _as_rgb(image)
    box = _check_region(region, original.width, original.height)
    rgb = _shrink(original)
    box = _scale_region(box, rgb.width / original.width)
    colours = _colormap(cmap)
    blended = overlay(rgb, heatmap, colours, alpha, region=box, vmin=vmin, vmax=vmax)
    figure = _figure(
        1, rgb.height / rgb.width, colorbar=colorbar, title=None, dpi=dpi, figsize=figsize
    )
    axes = figure.add_subplot()
    _show(axes, np.asarray(blended), title or "")
    _outline(axes, box)
    if colorbar:
        _colorbar(figure, axes, colours, _check_scale(vmin, vmax), colorbar_label)
    return figure


overlay_figure = _rendered(overlay_plot, "overlay_figure")


def grid_plot(
    image: ImageLike,
    panels: Sequence[tuple[str, MapLike]],
    title: str | None = None,
    cmap: str | Colormap = DEFAULT_CMAP,
    alpha: float = 0.5,
    extra_images: Sequence[tuple[str, ImageLike]] | None = None,
    region: Region | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str | None = None,
    dpi: float = _DPI,
    figsize: Sequence[float] | None = None,
) -> Figure:
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
        vmin, vmax, colorbar_label, dpi, figsize: as for :func:`overlay_plot` (one scale for
            every map).

    Returns:
        The figure (:func:`grid` renders it).

    Raises:
        ValueError: as for :func:`overlay_plot`.
    """
    original = _as_rgb(image)
    box = _check_region(region, original.width, original.height)
    rgb = _shrink(original)
    box = _scale_region(box, rgb.width / original.width)
    colours = _colormap(cmap)
    shown = [("original", np.asarray(rgb))]
    shown += [
        (label, np.asarray(overlay(rgb, heat, colours, alpha, box, vmin=vmin, vmax=vmax)))
        for label, heat in panels
    ]
    shown += [(label, np.asarray(_shrink(_as_rgb(extra)))) for label, extra in extra_images or []]
    figure = _figure(
        len(shown),
        rgb.height / rgb.width,
        colorbar=bool(panels),
        title=title,
        dpi=dpi,
        figsize=figsize,
    )
    axes = figure.subplots(1, len(shown), squeeze=False)[0]
    for index, (ax, (label, pixels)) in enumerate(zip(axes, shown, strict=True)):
        _show(ax, pixels, label)
        if index <= len(panels):
            _outline(ax, box)
    if panels:
        _colorbar(figure, list(axes), colours, _check_scale(vmin, vmax), colorbar_label)
    return figure


grid = _rendered(grid_plot, "grid")


# --------------------------------------------------------------------------- volumes


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
    return _peak(_as_map(heatmap, 3))


def _peak(heat: Tensor) -> tuple[int, int, int]:
    if float(heat.max()) == float(heat.min()):
        depth, height, width = heat.shape
        return depth // 2, height // 2, width // 2
    index = np.unravel_index(int(heat.argmax()), tuple(heat.shape))
    return int(index[0]), int(index[1]), int(index[2])


def _grey_volume(volume: MapLike) -> np.ndarray:
    """``(D, H, W, 3)`` uint8: the volume min-max scaled to grey (a constant one is black)."""
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
    result: np.ndarray = (grey * 255).round().to(torch.uint8).numpy()[..., None].repeat(3, axis=-1)
    return result


# Letters at the (top, bottom, left, right) of each view, for the axes of io.load_volume:
# D = superior → inferior, H = anterior → posterior, W = patient right → left.
_ORIENTATION = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def _nice_length(limit: float) -> float:
    """The largest of 1, 2, 5 × 10^k not above ``limit`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(limit))
    return max(step * power for step in (1.0, 2.0, 5.0) if step * power <= limit)


def _annotate(
    axes: Axes, view: str, shape: tuple[int, int], mm_per_column: float | None, letters: bool
) -> None:
    """Orientation letters at the panel's edges and a millimetre scale bar (bottom left)."""
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2, foreground="black")]
    style: dict[str, Any] = {
        "color": "white",
        "fontsize": 8,
        "path_effects": halo,
        "transform": axes.transAxes,
    }
    if letters:
        top, bottom, left, right = _ORIENTATION[view]
        axes.text(0.5, 0.98, top, ha="center", va="top", **style)
        axes.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
        axes.text(0.02, 0.5, left, ha="left", va="center", **style)
        axes.text(0.98, 0.5, right, ha="right", va="center", **style)
    if mm_per_column is not None:
        rows, columns = shape
        length = _nice_length(0.3 * columns * mm_per_column)
        start, y = 0.06 * columns - 0.5, 0.92 * rows - 0.5
        stop = start + length / mm_per_column
        axes.plot(
            [start, stop],
            [y, y],
            color="white",
            linewidth=2.5,
            path_effects=halo,
            scalex=False,
            scaley=False,
        )
        axes.text(
            (start + stop) / 2,
            y - 0.03 * rows,
            f"{length:g} mm",
            ha="center",
            va="bottom",
            **{**style, "transform": axes.transData},
        )


_View = tuple[str, str, np.ndarray, Tensor, float, float | None]
"""One slice of a montage: ``(view, label, grey, heat, aspect, mm per column)``."""


def _views(
    grey_rgb: np.ndarray,
    heat: Tensor,
    spacing: Sequence[float] | None,
    slices: Sequence[int] | None,
) -> list[_View]:
    if slices is None:
        d, h, w = _peak(heat)
    else:
        if len(slices) != 3 or not all(
            isinstance(i, (int, np.integer)) and 0 <= i < n
            for i, n in zip(slices, heat.shape, strict=False)
        ):
            raise ValueError(
                f"slices must be three voxel indices (d, h, w) inside {tuple(heat.shape)}, "
                f"got {slices}"
            )
        d, h, w = (int(i) for i in slices)
    mm = spacing is not None
    scale = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(scale) != 3 or not all(math.isfinite(s) and s > 0 for s in scale):
        raise ValueError(f"spacing must be three positive numbers (D, H, W), got {spacing}")
    dz, dy, dx = scale
    along_w, along_h = (dx, dy) if mm else (None, None)
    return [
        ("axial", f"axial  d={d}", grey_rgb[d], heat[d], dy / dx, along_w),
        ("coronal", f"coronal  h={h}", grey_rgb[:, h], heat[:, h], dz / dx, along_w),
        ("sagittal", f"sagittal  w={w}", grey_rgb[:, :, w], heat[:, :, w], dz / dy, along_h),
    ]


def _draw_montage(
    axes: Sequence[Axes],
    volume: MapLike,
    heatmap: MapLike,
    colours: Colormap,
    alpha: float,
    scale: tuple[float, float] | None,
    spacing: Sequence[float] | None,
    slices: Sequence[int] | None,
    orientation: bool,
    scale_bar: bool,
) -> None:
    grey_rgb = _grey_volume(volume)
    heat = _resize(_as_map(heatmap, 3, scale), tuple(grey_rgb.shape[:3]))
    views = _views(grey_rgb, heat, spacing, slices)
    weight = _check_alpha(alpha)
    if len(axes) != 3:
        raise ValueError(
            f"a volume is drawn on three axes (axial, coronal, sagittal), got {len(axes)}"
        )
    for ax, (view, label, pixels, heat_slice, aspect, mm) in zip(axes, views, strict=True):
        _show(ax, _blend(pixels, heat_slice, colours, weight), label, aspect)
        _annotate(
            ax,
            view,
            (heat_slice.shape[0], heat_slice.shape[1]),
            mm if scale_bar else None,
            orientation,
        )


def montage_plot(
    volume: MapLike,
    heatmap: MapLike,
    cmap: str | Colormap = DEFAULT_CMAP,
    alpha: float = 0.5,
    title: str | None = None,
    spacing: Sequence[float] | None = None,
    colorbar: bool = True,
    *,
    slices: Sequence[int] | None = None,
    orientation: bool = False,
    scale_bar: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str | None = None,
    dpi: float = _DPI,
    figsize: Sequence[float] | None = None,
) -> Figure:
    """Axial, coronal and sagittal slices through a 3-D heat map's peak, overlaid on the volume.

    The slices are ``volume[d]`` (axial), ``volume[:, h]`` (coronal) and ``volume[:, :, w]``
    (sagittal) at ``(d, h, w) =`` :func:`peak_voxel` of the heat map (or ``slices``) — the axis
    convention of :func:`evidencemap.io.load_volume`. The volume is min-max scaled to grey for
    display (a constant volume shows black); a heat map of another size is resized trilinearly
    to it.

    Args:
        volume: ``(D, H, W)`` or ``(1, D, H, W)`` tensor or array, any real range.
        heatmap: ``(D', H', W')`` or ``(1, D', H', W')`` with values in [0, 1] (or any with
            ``vmin``/``vmax``).
        cmap: matplotlib colormap name or object.
        alpha: weight of the heat-map colours, in [0, 1].
        title: optional title above the panels.
        spacing: optional voxel size in mm along ``(D, H, W)``, so anisotropic voxels keep
            their true proportions; with it each panel gets a millimetre scale bar.
        colorbar: whether to draw the colour bar.
        slices: ``(d, h, w)`` voxel indices (in the volume) to cut at instead of the peak.
        orientation: label each panel's edges with the patient directions (axial: A, P, R, L;
            coronal: S, I, R, L; sagittal: S, I, A, P), valid for NIfTI and DICOM volumes read
            by :func:`evidencemap.io.load_volume` (not for ``.npy`` arrays, which carry no
            geometry).
        scale_bar: draw the millimetre scale bar when ``spacing`` is given.
        vmin, vmax, colorbar_label, dpi, figsize: as for :func:`overlay_plot`.

    Returns:
        The figure (:func:`montage` renders it).

    Raises:
        ValueError: for shapes other than those above, non-finite values, heat values outside
            [0, 1] without a scale, non-positive spacing, slices outside the volume, an unknown
            colormap or ``alpha`` outside [0, 1].
    """
    colours = _colormap(cmap)
    scale = _check_scale(vmin, vmax)
    figure = _figure(3, 1.0, colorbar=colorbar, title=title, dpi=dpi, figsize=figsize)
    axes = list(figure.subplots(1, 3))
    _draw_montage(
        axes, volume, heatmap, colours, alpha, scale, spacing, slices, orientation, scale_bar
    )
    if colorbar:
        _colorbar(figure, axes, colours, scale, colorbar_label)
    return figure


montage = _rendered(montage_plot, "montage")


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


def _output_path(
    path: str | os.PathLike[str], format: str | None, formats: Sequence[str]
) -> tuple[Path, str]:
    """The file to write and its format: ``format``, else the path's suffix (``.tif`` is
    TIFF); a path whose suffix is not the format gets ``.FORMAT`` appended."""
    out = Path(path)
    suffix = out.suffix.lower().lstrip(".")
    suffix = "tiff" if suffix == "tif" else suffix
    chosen = (format or suffix).lower()
    chosen = "tiff" if chosen == "tif" else chosen
    if chosen not in formats:
        given = f"format {format!r}" if format else f"suffix {out.suffix!r} of {out}"
        raise ValueError(f"{given}: expected one of {', '.join(formats)}")
    if suffix != chosen:
        out = out.with_name(f"{out.name}.{chosen}")
    return out, chosen


def save_figure(
    figure: Figure,
    path: str | os.PathLike[str],
    format: str | None = None,
    dpi: float | None = None,
) -> Path:
    """Write a figure as PNG, PDF or SVG (:data:`FIGURE_FORMATS`).

    PDF and SVG keep titles, colour bars and outlines as vectors (the photo and the map are
    images inside them, at ``dpi``); no creation date is written.

    Args:
        figure: a figure of a ``*_plot`` builder or :func:`figure`.
        path: the target; its suffix chooses the format unless ``format`` is given (then
            ``.FORMAT`` is appended where the suffix differs).
        format: ``"png"``, ``"pdf"`` or ``"svg"``.
        dpi: pixels per inch (default: the figure's own).

    Returns:
        The path written (the parent folder is created when missing).

    Raises:
        ValueError: for another format or a bad ``dpi``.
    """
    out, chosen = _output_path(path, format, FIGURE_FORMATS)
    resolution = figure.dpi if dpi is None else _check_dpi(dpi)
    metadata = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[chosen]
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)  # a canvas that can print every format, without pyplot
    figure.savefig(out, format=chosen, dpi=resolution, metadata=metadata, facecolor="white")
    return out


def save_map(
    heatmap: MapLike,
    path: str | os.PathLike[str],
    *,
    image: ImageLike | None = None,
    cmap: str | Colormap = DEFAULT_CMAP,
    alpha: float = 0.5,
    region: Region | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    format: str | None = None,
) -> Path:
    """Write a bare map — no title, no colour bar, no axes — as PNG or 16-bit TIFF.

    * PNG: ``cmap(map)`` at the map's own resolution (2-D maps), or, with ``image``, the
      :func:`overlay` on it at the image's resolution (``region`` washed out as there).
    * TIFF: the map's values themselves as unsigned 16-bit grey (ImageJ/Fiji, GIMP, Python
      read it): ``round(65535 · (v − vmin) / (vmax − vmin))`` clipped, i.e. ``65535 · v``
      for maps in [0, 1]; a 3-D map ``(D, H, W)`` is one page per axial slice ``d``.

    Args:
        heatmap: ``(H, W)`` / ``(1, H, W)`` (TIFF also ``(D, H, W)`` / ``(1, D, H, W)``) in
            [0, 1], or any finite values with ``vmin``/``vmax``.
        path: the target; its suffix (``.png``, ``.tif``, ``.tiff``) chooses the format unless
            ``format`` is given.
        image: PNG only: the photo to overlay the map on.
        cmap, alpha, region: PNG only, as for :func:`overlay`.
        vmin, vmax: the values mapped to the ends of the colour map / of the 16-bit range.
        format: ``"png"`` or ``"tiff"``.

    Returns:
        The path written.

    Raises:
        ValueError: for another format, a map of the wrong shape or range, ``image`` with a
            TIFF, or a 3-D map as PNG.
    """
    out, chosen = _output_path(path, format, MAP_FORMATS)
    scale = _check_scale(vmin, vmax)
    out.parent.mkdir(parents=True, exist_ok=True)
    if chosen == "tiff":
        if image is not None:
            raise ValueError("a TIFF map holds the map's values only; save overlays as PNG")
        values = _as_any_map(heatmap, scale)
        levels = np.rint(values.double().numpy() * _UINT16).astype(np.uint16)
        pages = [Image.fromarray(page) for page in (levels if levels.ndim == 3 else [levels])]
        pages[0].save(out, format="TIFF", save_all=len(pages) > 1, append_images=pages[1:])
        return out
    if image is not None:
        overlay(image, heatmap, cmap, alpha, region, vmin=vmin, vmax=vmax).save(out, format="PNG")
        return out
    heat = _as_map(heatmap, 2, scale)
    colours = _colormap(cmap)(heat.numpy())[..., :3]
    Image.fromarray(np.rint(colours * 255).astype(np.uint8)).save(out, format="PNG")
    return out


def _as_any_map(heatmap: MapLike, scale: tuple[float, float] | None) -> Tensor:
    """A 2-D or 3-D map as colour positions in [0, 1]."""
    heat = heatmap.detach().cpu() if isinstance(heatmap, Tensor) else torch.as_tensor(heatmap)
    squeezed = heat[0] if heat.ndim in (3, 4) and heat.shape[0] == 1 else heat
    if squeezed.ndim not in (2, 3):
        raise ValueError(
            f"heatmap must be (H, W), (D, H, W) or either with a leading 1, got {tuple(heat.shape)}"
        )
    return _as_map(squeezed, squeezed.ndim, scale)


# --------------------------------------------------------------------------- explanations


def is_signed(explanation: Explanation) -> bool:
    """Whether an explanation's sign carries meaning, so it is drawn on a diverging scale.

    True for ``relu=False`` (CAM family), ``abs=False`` (saliency), ``counterfactual=True``
    (evidence *against* the target: drawn on the negative side, in blue), and Integrated
    Gradients (signed attributions) unless ``sign="absolute"``; also when these options are
    those of a method wrapped by SmoothGrad. False otherwise (the 0–1 "evidence" maps).
    """
    options = effective_options(explanation.options)
    if options.get("relu") is False or options.get("abs") is False:
        return True
    if options.get("counterfactual") is True:
        return True
    names = {explanation.method, options.get("method")}
    return "integrated_gradients" in names and options.get("sign") != "absolute"


def _pixel_level(explanation: Explanation) -> bool:
    raw = explanation.raw
    return isinstance(raw, Tensor) and raw.shape[2:] == explanation.maps.shape[2:]


def signed_values(explanation: Explanation) -> Tensor:
    """The signed map ``(N, 1, *S)`` at the maps' resolution, in the units of ``raw``:
    positive where the region raises the target's score, negative where it lowers it.

    ``raw`` with several channels (input-space methods: ``(N, C, *S)``) is summed over them
    (IG: ``Σ_c IG_c``, so the map sums to the attributions' total); a layer map ``(N, 1, *s)``
    is upsampled (bilinear / trilinear); several layers are each divided by their largest
    magnitude and averaged. A counterfactual map (``counterfactual=True``: evidence against
    the target) is negated, so that red always means "for the target".
    """
    size = explanation.maps.shape[2:]

    def one(raw: Tensor) -> Tensor:
        values = raw.detach().float()
        if values.shape[1] != 1:
            values = values.sum(dim=1, keepdim=True)
        return upsample(values, size)

    raw = explanation.raw
    if isinstance(raw, list):
        parts = [one(r) for r in raw]
        parts = [
            p / p.flatten(1).abs().amax(1).clamp(min=FLAT_EPS).view(-1, *[1] * (p.ndim - 1))
            for p in parts
        ]
        values = torch.stack(parts).mean(0)
    else:
        values = one(raw)
    if effective_options(explanation.options).get("counterfactual") is True:
        values = -values
    return values


def symmetric_scale(values: Tensor, percentile: float = 100.0) -> Tensor:
    """``m`` per sample of ``(N, …)`` signed values for a colour scale ``[−m, m]``.

    ``m`` is the ``percentile``-th percentile of ``|v|`` (100: the largest; pixel-level maps
    are heavy-tailed and shown saturated at :data:`DISPLAY_PERCENTILE`), the largest ``|v|``
    where that is 0, and 1 for an all-zero map.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    magnitude = values.detach().abs().flatten(1).float()
    top = magnitude.amax(dim=1)
    k = max(1, min(magnitude.shape[1], round(percentile / 100 * magnitude.shape[1])))
    m = magnitude.kthvalue(k, dim=1).values
    m = torch.where(m > 0, m, top)
    return torch.where(m > 0, m, torch.ones_like(m))


@dataclass
class Look:
    """How one sample is coloured (:func:`look`): ``heat`` ``(1, *S)`` the values drawn,
    ``scale`` the colour scale ``(vmin, vmax)`` (``None``: [0, 1]), ``cmap`` the colour map,
    ``label`` the colour bar's label."""

    heat: Tensor
    scale: tuple[float, float] | None
    cmap: str | Colormap
    label: str

    @property
    def signed(self) -> bool:
        """Whether the values are signed (drawn on a symmetric scale ``[−m, m]``)."""
        return self.scale is not None


_Look = Look


def look(
    explanation: Explanation,
    index: int = 0,
    *,
    signed: bool | None = None,
    cmap: str | Colormap | None = None,
) -> Look:
    """How :func:`figure` colours sample ``index``: signed maps (:func:`is_signed`, or
    ``signed=True``) as :func:`signed_values` on ``[−m, m]`` (:func:`symmetric_scale`, at
    :data:`DISPLAY_PERCENTILE` for pixel-level maps) with :data:`SIGNED_CMAP` and the bar label
    :data:`SIGNED_LABEL`; the others as :func:`for_display` of the maps on [0, 1] with
    :data:`DEFAULT_CMAP` and :data:`EVIDENCE_LABEL`. ``cmap`` replaces the colour map only.

    Raises:
        ValueError: for an index outside the batch.
    """
    return _look(explanation, index, signed, cmap)


def _look(explanation: Explanation, index: int, signed: bool | None, cmap: Any) -> Look:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(explanation):
        raise ValueError(f"index must be an int in [0, {len(explanation)}), got {index!r}")
    if signed is None:
        signed = is_signed(explanation)
    if signed:
        values = signed_values(explanation)[index : index + 1]
        percentile = DISPLAY_PERCENTILE if _pixel_level(explanation) else 100.0
        m = float(symmetric_scale(values, percentile)[0])
        return _Look(values[0].cpu(), (-m, m), cmap or SIGNED_CMAP, SIGNED_LABEL)
    shown = for_display(explanation.maps, explanation.raw)[index]
    return _Look(shown.detach().float().cpu(), None, cmap or DEFAULT_CMAP, EVIDENCE_LABEL)


def _preprocessor(model: Any) -> Any:
    """The image preprocessor of a ``LoadedModel`` (or the preprocessor itself), or ``None``."""
    if model is None:
        return None
    pre = getattr(model, "preprocess", model)
    if pre is None:
        return None
    if not (hasattr(pre, "to_original") and hasattr(pre, "crop_box")):
        raise TypeError(
            "model must be a LoadedModel of an image model or its ImagePreprocessor, got "
            f"{type(model).__name__}"
        )
    return pre


def _default_title(explanation: Explanation, index: int, model: Any) -> str:
    """``"METHOD — LABEL P"`` as the command line writes it, with the method's variant."""
    score = float(explanation.scores[index])
    if explanation.targets is None:
        return f"{explanation.label} — custom target (score {score:.3g})"
    cls = int(explanation.targets[index])
    namer = getattr(model, "label", None)
    name = namer(cls) if callable(namer) else f"class {cls}"
    output = explanation.output
    if output is not None and output.ndim == 2 and output.shape[1] > 1:
        probability = float(torch.softmax(output[index].detach().float(), dim=0)[cls])
        return f"{explanation.label} — {name} {probability:.2f}"
    return f"{explanation.label} — {name} (score {score:.3g})"


def _as_display_image(image: Any, pre: Any) -> ImageLike:
    """A model-input tensor shown as the model saw it (``pre.to_pixels``, or min-max scaled);
    photos as they are."""
    if not isinstance(image, Tensor) or not image.is_floating_point():
        shown: ImageLike = image
        return shown
    pixels = image.detach()[0] if image.ndim == 4 else image.detach()
    if pre is not None:
        return (pre.to_pixels(pixels.float()) / 255.0).clamp(0, 1).cpu()
    low, high = float(pixels.min()), float(pixels.max())
    if low >= 0.0 and high <= 1.0:
        return pixels.cpu()
    return ((pixels - low) / (high - low) if high > low else pixels * 0).cpu()


@dataclass
class _Plan:
    """What to draw: a photo overlay, a grid with an explanation image, or a montage."""

    kind: str
    image: Any
    heat: Tensor
    region: Region | None = None
    extra: tuple[str, Any] | None = None


def _plan(
    explanation: Explanation,
    index: int,
    image: Any,
    pre: Any,
    look: _Look,
    with_extra: bool = True,
) -> _Plan:
    heat = look.heat
    if explanation.maps.ndim == 5:
        volume = torch.zeros(heat.shape[1:]) if image is None else image
        return _Plan("montage", volume, heat)
    if image is None:
        blank = np.full((*heat.shape[1:], 3), 255, np.uint8)
        return _Plan("map", blank, heat)
    shown = explanation.explanation_image(index) if with_extra else None
    if pre is not None and shown is not None and shown.image.ndim == 3:
        seen = image if isinstance(image, Tensor) else pre(image)
        label = "explanation" if shown.kind == "explanation" else "deleted evidence"
        if shown.score is not None:
            label += f", p{'' if shown.kind == 'explanation' else ' without it'} {shown.score:.2f}"
        extra = (label, _as_display_image(shown.image, pre))
        return _Plan("grid", _as_display_image(seen, pre), heat, extra=extra)
    if pre is not None and not isinstance(image, Tensor):
        photo = _as_rgb(image)
        on_photo = pre.to_original(heat[None].to(torch.float32), photo.width, photo.height)[0]
        return _Plan("overlay", photo, on_photo, pre.crop_box(photo.width, photo.height).region())
    return _Plan("overlay", _as_display_image(image, pre), heat)


def figure(
    explanation: Explanation,
    image: Any = None,
    *,
    index: int = 0,
    model: Any = None,
    signed: bool | None = None,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    colorbar: bool = True,
    spacing: Sequence[float] | None = None,
    orientation: bool = False,
    slices: Sequence[int] | None = None,
    dpi: float = _DPI,
    figsize: Sequence[float] | None = None,
) -> Figure:
    """Sample ``index`` of an explanation drawn as the command line draws it.

    * a photo with ``model`` (a ``LoadedModel`` or its preprocessor): the map projected onto
      the original photo, coloured only inside the model's centre crop, which is outlined
      (dashed); FGVis' explanation image is shown beside the model's view of the photo;
    * a model-input tensor ``(C, H, W)``: the map over the input as the model saw it;
    * a volume ``(D, H, W)`` / ``(C, D, H, W)`` for a 3-D map: :func:`montage_plot`
      (``spacing``, ``orientation``, ``slices``);
    * no image: the coloured map alone.

    Unsigned maps are coloured 0–1 with :data:`DEFAULT_CMAP` (pixel-level maps saturated by
    :func:`for_display`); signed ones (:func:`is_signed`, or ``signed=True``) with
    :data:`SIGNED_CMAP` on ``[−m, m]`` of :func:`signed_values` (``m`` from
    :func:`symmetric_scale`). The title names the method's variant
    (:attr:`Explanation.label`), the target and its probability.

    Args:
        explanation: the result of a method.
        image: the photo (PIL, uint8 array), the model input, the volume, or ``None``.
        index: the sample of the batch.
        model: image models: the ``LoadedModel`` (or ``ImagePreprocessor``), for the crop,
            the class names and showing a model input as pixels.
        signed: force the diverging signed display (``True``) or the 0–1 one (``False``).
        cmap: the colour map (default by sign, above).
        alpha: weight of the heat colours.
        title: the title (``""``: none; default as above).
        colorbar: whether to draw the colour bar.
        spacing, orientation, slices: volumes, as for :func:`montage_plot`.
        dpi, figsize: as for :func:`overlay_plot`.

    Returns:
        The figure; :func:`save_figure` writes it as PNG, PDF or SVG, :func:`render` makes an
        image of it.

    Raises:
        ValueError: for an index outside the batch, or as the builders.
        TypeError: for a ``model`` without a preprocessor.
    """
    pre = _preprocessor(model)
    look = _look(explanation, index, signed, cmap)
    text = _default_title(explanation, index, model) if title is None else title
    plan = _plan(explanation, index, image, pre, look)
    vmin, vmax = look.scale if look.scale is not None else (None, None)
    style: dict[str, Any] = {
        "vmin": vmin,
        "vmax": vmax,
        "colorbar_label": look.label,
        "dpi": dpi,
        "figsize": figsize,
    }
    if plan.kind == "montage":
        return montage_plot(
            plan.image,
            plan.heat,
            look.cmap,
            alpha,
            text,
            spacing,
            colorbar,
            slices=slices,
            orientation=orientation,
            **style,
        )
    if plan.kind == "grid" and plan.extra is not None:
        return grid_plot(
            plan.image,
            [(text, plan.heat)],
            cmap=look.cmap,
            alpha=alpha,
            extra_images=[plan.extra],
            **style,
        )
    weight = 1.0 if plan.kind == "map" else alpha
    return overlay_plot(
        plan.image, plan.heat, text, look.cmap, weight, colorbar, plan.region, **style
    )


def plot(
    explanation: Explanation,
    image: Any = None,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    index: int = 0,
    model: Any = None,
    signed: bool | None = None,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    colorbar: bool = True,
    spacing: Sequence[float] | None = None,
    orientation: bool = False,
    slices: Sequence[int] | None = None,
) -> Axes | list[Axes]:
    """Draw sample ``index`` of an explanation into matplotlib axes, in one call.

    The same picture as :func:`figure` (same arguments): the overlay with the model's crop
    outlined, or for a volume its three slices. With ``ax=None`` a new figure is made (no
    ``pyplot``: reach it as ``ax.figure``); a 2-D map is drawn on one ``Axes``, a 3-D one on a
    sequence of three (e.g. ``fig.subplots(1, 3)``). FGVis' explanation image is left out
    (:func:`figure` shows it).

    Returns:
        The axes drawn on (a list of three for volumes).

    Raises:
        ValueError: as for :func:`figure`, and for the wrong number of axes.
    """
    if ax is None:
        drawn = figure(
            explanation,
            image,
            index=index,
            model=model,
            signed=signed,
            cmap=cmap,
            alpha=alpha,
            title=title,
            colorbar=colorbar,
            spacing=spacing,
            orientation=orientation,
            slices=slices,
        )
        axes = [a for a in drawn.axes if a.images]
        return axes[0] if explanation.maps.ndim == 4 else axes
    pre = _preprocessor(model)
    look = _look(explanation, index, signed, cmap)
    text = _default_title(explanation, index, model) if title is None else title
    colours, scale = _colormap(look.cmap), look.scale
    vmin, vmax = scale if scale is not None else (None, None)
    if explanation.maps.ndim == 5:
        many = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
        plan = _plan(explanation, index, image, pre, look)
        _draw_montage(
            many, plan.image, plan.heat, colours, alpha, scale, spacing, slices, orientation, True
        )
        many[1].set_title(f"{text}\n{many[1].get_title()}", fontsize=9)
        if colorbar:
            _colorbar(_figure_of(many[0]), many, colours, scale, look.label)
        return many
    if not isinstance(ax, Axes):
        raise ValueError(f"a 2-D map is drawn on one matplotlib Axes, got {type(ax).__name__}")
    plan = _plan(explanation, index, image, pre, look, with_extra=False)
    weight = 1.0 if plan.kind == "map" else alpha
    rgb = _as_rgb(plan.image)
    blended = overlay(rgb, plan.heat, colours, weight, plan.region, vmin=vmin, vmax=vmax)
    _show(ax, np.asarray(blended), text)
    _outline(ax, plan.region)
    if colorbar:
        _colorbar(_figure_of(ax), ax, colours, scale, look.label)
    return ax


def _figure_of(axes: Axes) -> Figure:
    owner = axes.figure
    while not isinstance(owner, Figure):  # a SubFigure: its parent figure draws the bar
        owner = owner.figure
    return owner


def save(
    explanation: Explanation,
    path: str | os.PathLike[str],
    image: Any = None,
    *,
    bare: bool = False,
    format: str | None = None,
    index: int = 0,
    model: Any = None,
    signed: bool | None = None,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    dpi: float = _DPI,
    **options: Any,
) -> Path:
    """Write sample ``index`` of an explanation: the :func:`figure` as PNG, PDF or SVG, or with
    ``bare=True`` the map alone (:func:`save_map`: PNG — over ``image`` when given, at its
    resolution — or 16-bit TIFF of the values on the colour scale).

    Args:
        explanation, image, index, model, signed, cmap, alpha: as for :func:`figure`.
        path: the target; its suffix chooses the format unless ``format`` is given.
        bare: the map without title, colour bar or axes.
        format: figures: ``png``, ``pdf``, ``svg``; bare maps: ``png``, ``tiff``.
        dpi: figures: pixels per inch.
        **options: figures: ``title``, ``colorbar``, ``spacing``, ``orientation``,
            ``slices``, ``figsize``.

    Returns:
        The path written.
    """
    if not bare:
        drawn = figure(
            explanation,
            image,
            index=index,
            model=model,
            signed=signed,
            cmap=cmap,
            alpha=alpha,
            dpi=dpi,
            **options,
        )
        return save_figure(drawn, path, format, dpi)
    pre = _preprocessor(model)
    look = _look(explanation, index, signed, cmap)
    plan = _plan(explanation, index, image, pre, look)
    vmin, vmax = look.scale if look.scale is not None else (None, None)
    overlay_on = None if plan.kind in ("map", "montage") else plan.image
    heat = plan.heat if overlay_on is not None else look.heat
    return save_map(
        heat,
        path,
        image=overlay_on,
        cmap=look.cmap,
        alpha=alpha,
        region=plan.region,
        vmin=vmin,
        vmax=vmax,
        format=format,
    )


def show(explanation: Explanation, image: Any = None, **options: Any) -> None:
    """Show the :func:`figure` of an explanation: inline in a Jupyter notebook (IPython's
    display), else in the system's image viewer (``PIL.Image.show``). Takes the arguments
    of :func:`figure`."""
    picture = render(figure(explanation, image, **options))
    try:
        from IPython import get_ipython
        from IPython.display import Image as IPythonImage
        from IPython.display import display
    except ImportError:
        picture.show()
        return
    if get_ipython() is None:
        picture.show()
        return
    display(IPythonImage(data=to_png_bytes(picture), format="png"))


def repr_png(explanation: Explanation) -> bytes:
    """PNG of a batch's maps for a notebook's rich display: up to eight samples side by side
    (volumes: the axial slice through each map's peak), titled with target and score, one
    colour bar (signed maps: each on its own symmetric scale, shown as −1 … 1)."""
    count = min(len(explanation), _REPR_SAMPLES)
    signed = is_signed(explanation)
    if signed:
        values = signed_values(explanation)[:count]
        percentile = DISPLAY_PERCENTILE if _pixel_level(explanation) else 100.0
        m = symmetric_scale(values, percentile).view(-1, *[1] * (values.ndim - 1))
        heat, scale, cmap = (values / m).clamp(-1, 1), (-1.0, 1.0), SIGNED_CMAP
    else:
        heat = for_display(explanation.maps, explanation.raw)[:count].float()
        scale, cmap = None, DEFAULT_CMAP
    heat = heat.detach().cpu()[:, 0]
    if heat.ndim == 4:  # volumes: the axial slice through each peak
        heat = torch.stack([h[_peak(h.abs())[0]] for h in heat])
    colours = _colormap(cmap)
    figure_ = _figure(count, heat.shape[1] / heat.shape[2], colorbar=True, title=explanation.label)
    axes = figure_.subplots(1, count, squeeze=False)[0]
    for i, ax in enumerate(axes):
        position = _as_map(heat[i], 2, scale).numpy()
        pixels = np.rint(colours(position)[..., :3] * 255).astype(np.uint8)
        target = "" if explanation.targets is None else f"class {int(explanation.targets[i])}, "
        _show(ax, pixels, f"#{i}: {target}score {float(explanation.scores[i]):.3g}")
    label = SIGNED_LABEL + " / m" if signed else EVIDENCE_LABEL
    _colorbar(figure_, list(axes), colours, scale, label)
    return to_png_bytes(render(figure_))
