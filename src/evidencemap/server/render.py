"""What the service sends back: explanations as PNG data URLs and float arrays, and downloads.

Pure functions from the library's results (an :class:`~evidencemap.explanation.Explanation`,
the photo, the model's preprocessing) to the response models of
:mod:`evidencemap.server.schemas`; nothing here computes a map or imports FastAPI.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evidencemap import viz
from evidencemap.explanation import Explanation
from evidencemap.models.preprocess import ImagePreprocessor
from evidencemap.server.forms import SCALARS
from evidencemap.server.schemas import ArrayData, ExplanationResult

__all__ = [
    "COLORMAP",
    "OVERLAY_ALPHA",
    "array",
    "decode_array",
    "display",
    "finite",
    "method_results",
    "png_url",
]

COLORMAP = "jet"
"""The colour map of the overlays and heat maps."""
OVERLAY_ALPHA = 0.5
"""Opacity of the map in ``overlay_png``."""


def array(values: Tensor) -> ArrayData:
    """A tensor → :class:`ArrayData` (float32, little-endian, base64)."""
    data = np.ascontiguousarray(values.detach().cpu().numpy(), dtype="<f4")
    return ArrayData(shape=list(data.shape), data=base64.b64encode(data.tobytes()).decode())


def decode_array(item: ArrayData) -> np.ndarray:
    """:class:`ArrayData` → the float32 array it holds.

    Raises:
        ValueError: when the data does not hold ``shape``'s number of float32 values.
    """
    values = np.frombuffer(base64.b64decode(item.data, validate=True), dtype="<f4")
    if values.size != math.prod(item.shape):
        raise ValueError(f"array data holds {values.size} values, not shape {item.shape}")
    return values.reshape(item.shape)


def png_url(image: Image.Image) -> str:
    """A PIL image → a ``data:image/png;base64,`` URL."""
    return "data:image/png;base64," + base64.b64encode(viz.to_png_bytes(image)).decode()


def finite(value: float) -> float:
    """JSON has no NaN/inf: report them as 0 (never produced by the methods' maps)."""
    return value if math.isfinite(value) else 0.0


def display(
    image: Image.Image, preprocess: ImagePreprocessor, display_size: int
) -> tuple[Image.Image, list[float]]:
    """The model's centre crop of the photo at display resolution, and its box
    ``[left, top, right, bottom]`` in photo pixels."""
    size = preprocess.size
    crop = [float(v) for v in preprocess.crop_box(image.width, image.height).region()]
    side = int(min(display_size, max(size, round(crop[2] - crop[0]))))
    box = (crop[0], crop[1], crop[2], crop[3])
    return image.resize((side, side), Image.Resampling.BICUBIC, box=box), crop


def _explanation_image(
    explanation: Explanation, row: int, size: tuple[int, int], preprocess: ImagePreprocessor
) -> dict[str, Any]:
    """The explanation image of ``row`` (FGVis) and the model's score on it, if any."""
    shown = explanation.explanation_image(row)
    if shown is None or shown.image.ndim != 3:
        return {}
    pixels = preprocess.to_pixels(shown.image.detach().cpu()).clamp(0, 255)
    picture = Image.fromarray(pixels.round().to(torch.uint8).permute(1, 2, 0).numpy())
    return {
        "explanation_png": png_url(picture.resize(size, Image.Resampling.BICUBIC)),
        "explanation_kind": shown.kind,
        "explanation_score": None if shown.score is None else finite(shown.score),
        "explanation_top1": shown.top1,
    }


def method_results(
    name: str,
    explanation: Explanation,
    chosen: Sequence[int],
    seconds: float,
    shown: Image.Image,
    preprocess: ImagePreprocessor,
    label: Callable[[int], str],
) -> list[ExplanationResult]:
    """One :class:`ExplanationResult` per explained class of one method's explanation.

    Args:
        name: the method's name.
        explanation: the method's explanation of the classes ``chosen`` (one row each).
        seconds: what the method took for all of them.
        shown: the crop at display resolution (:func:`display`), under the overlays.
        preprocess: the model's preprocessing (to draw FGVis' explanation image).
        label: class index → name.
    """
    raws = explanation.raw if isinstance(explanation.raw, list) else [explanation.raw]
    coloured = viz.for_display(explanation.maps, explanation.raw).detach().cpu()
    options = {k: v if isinstance(v, SCALARS) else repr(v) for k, v in explanation.options.items()}
    results = []
    for i, index in enumerate(chosen):
        heat = coloured[i, 0]
        results.append(
            ExplanationResult(
                method=name,
                target=index,
                label=label(index),
                score=finite(float(explanation.scores[i])),
                layer=explanation.layer,
                options=options,
                seconds=seconds,
                overlay_png=png_url(viz.overlay(shown, heat, COLORMAP, OVERLAY_ALPHA)),
                heatmap_png=png_url(viz.overlay(shown, heat, COLORMAP, 1.0)),
                map=array(explanation.maps[i, 0]),
                raw=[array(r[i, 0]) for r in raws],
                warning=explanation.warning(i),
                **_explanation_image(explanation, i, shown.size, preprocess),
            )
        )
    return results
