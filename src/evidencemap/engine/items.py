"""Inputs → items: a photo or volume file read and turned into the model's input
(:func:`prepare`), with what its manifest says about it (:class:`Item`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from evidencemap import io
from evidencemap.models.loading import LoadedModel

__all__ = [
    "Item",
    "crop_region",
    "prepare",
]


@dataclass
class Item:
    """One input read and preprocessed.

    Attributes:
        path: the input file (or DICOM folder).
        base: output path without the ``_METHOD.ext`` ending.
        kind: ``"image"`` or ``"volume"``.
        tensor: the model input, ``(C, H, W)`` or ``(C, D, H, W)``.
        photo: the original photo (images), else ``None``.
        volume: the original volume ``(C, D, H, W)`` (volumes), else ``None``.
        meta: what the manifest should say about the input (size, crop, spacing…).
        warnings: what the reader noticed (a photo smaller than the model's input).
    """

    path: Path
    base: Path
    kind: str
    tensor: Tensor
    photo: Image.Image | None = None
    volume: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def crop_region(loaded: LoadedModel, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width × height`` photo inside the model's centre crop, in its pixels."""
    pre = loaded.preprocess
    if pre is None:
        raise ValueError("volume models have no crop")
    return pre.crop_box(width, height).region()


def _input_channels(loaded: LoadedModel) -> int | None:
    """The channels the model's first convolution takes (``None`` when it has none)."""
    for module in loaded.module.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int):
            return channels
    return None


def _prepare_volume(
    path: Path,
    base: Path,
    loaded: LoadedModel,
    window: tuple[float, float] | None,
    frame: int | None,
) -> Item:
    volume, meta = io.load_volume(path, frame=frame)
    wanted = _input_channels(loaded)
    # one channel is left to the model (some repeat it, like the inflated CT network)
    if wanted is not None and volume.shape[0] > 1 and volume.shape[0] != wanted:
        raise ValueError(
            f"{path}: {volume.shape[0]} channels, but {loaded.name} takes {wanted} "
            f"channel{'s' if wanted != 1 else ''}"
        )
    x = io.normalise_volume(volume, window)
    if loaded.input_size is not None and tuple(x.shape[1:]) != loaded.input_size:
        x = F.interpolate(x[None], size=loaded.input_size, mode="trilinear", align_corners=False)[0]
    kept = ("format", "original_shape", "shape", "spacing", "affine", "frame", "frames")
    meta = {k: meta[k] for k in kept if k in meta}
    meta["model_input_shape"] = list(x.shape)
    return Item(path, base, "volume", x, volume=volume, meta=meta)


def prepare(
    path: Path,
    base: Path,
    loaded: LoadedModel,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> Item:
    """Read ``path`` and turn it into the model's input (volumes: frame ``frame`` of a 4-D
    file when given). A photo smaller than the model's crop is upsampled, with a warning.

    Raises:
        FileNotFoundError: when it does not exist.
        ValueError: when it cannot be read, is a photo for a volume model or the reverse, or a
            4-D file without ``frame`` (the message names the 4th axis), or a volume whose
            channels the model does not take.
        ImportError: when a volume format needs a package that is missing.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if io.is_volume_path(path):
        if loaded.kind != "volume":
            raise ValueError(f"{path} is a volume but {loaded.name} takes images; give a 3-D model")
        return _prepare_volume(path, base, loaded, window, frame)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: use 'evidencemap batch' for folders")
    if loaded.kind != "image" or loaded.preprocess is None:
        raise ValueError(f"{path} is a photo but {loaded.name} takes volumes")
    photo = io.load_image(path)
    pre = loaded.preprocess
    x = pre(photo)
    region = crop_region(loaded, photo.width, photo.height)
    meta = {
        "image_size": [photo.width, photo.height],
        "model_input_shape": list(x.shape),
        "crop_region": [round(v, 2) for v in region],
    }
    notes = []
    size = int(getattr(pre, "size", 0))
    if min(photo.width, photo.height) < size:
        notes.append(
            f"the photo is {photo.width}×{photo.height} px, smaller than the model's "
            f"{size}×{size} input: it was upsampled, so the map has more detail than the photo"
        )
    return Item(path, base, "image", x, photo=photo, meta=meta, warnings=notes)
