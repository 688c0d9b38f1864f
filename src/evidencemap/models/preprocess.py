"""Image preprocessing of the built-in models, and the way back from model input to the photo.

Pixels in, tensors out: a PIL image or a uint8 array is resized so its shorter side is
``resize`` (bicubic), centre-cropped to ``size × size`` and normalised as
``(pixel - mean) / std``. :meth:`ImagePreprocessor.to_original` projects a map made at the model's
input resolution back onto the original photo, so overlays line up with what the user gave.
:class:`CropBox` is the one description of that geometry (photo ↔ model input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["CropBox", "ImagePreprocessor", "to_rgb_image"]


@dataclass(frozen=True)
class CropBox:
    """How a ``width × height`` photo becomes the ``size × size`` model input, and the way back.

    The photo is resized to ``resized_width × resized_height`` (shorter side ``resize``, each
    side rounded and at least ``size``), and the model input is the ``size × size`` square whose
    top-left corner is ``(left, top)`` in the resized image. Resizing maps photo coordinate
    ``x`` (pixel edges, x right, y down) to ``x · resized_width / width``, so:

    * photo → input: ``x' = x · resized_width / width − left``, ``y' = y · resized_height /
      height − top`` (:meth:`to_input`);
    * the part of the photo the model sees: ``left · width / resized_width`` …
      ``(left + size) · width / resized_width`` across, the same down (:meth:`region`).

    This is the one description of that geometry: the preprocessing, the maps projected back
    onto the photo, the crop shown by the command line and the web page, and the evaluation's
    boxes all use it.
    """

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    size: int

    @classmethod
    def centre(cls, width: int, height: int, size: int, resize: int) -> CropBox:
        """The centre crop of side ``size`` after resizing the shorter side to ``resize``.

        Raises:
            ValueError: for a width, height, size or resize below 1.
        """
        for name, value in (("width", width), ("height", height), ("size", size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if resize < 1:
            raise ValueError(f"resize must be >= 1, got {resize}")
        scale = resize / min(width, height)
        new_w = max(size, round(width * scale))
        new_h = max(size, round(height * scale))
        return cls(width, height, new_w, new_h, (new_w - size) // 2, (new_h - size) // 2, size)

    @property
    def scale_x(self) -> float:
        """Resized pixels per photo pixel across."""
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        """Resized pixels per photo pixel down."""
        return self.resized_height / self.height

    def region(self) -> tuple[float, float, float, float]:
        """The part of the photo inside the model input: ``(left, top, right, bottom)`` in
        photo pixels."""
        return (
            self.left / self.scale_x,
            self.top / self.scale_y,
            (self.left + self.size) / self.scale_x,
            (self.top + self.size) / self.scale_y,
        )

    def to_input(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Photo box ``(x0, y0, x1, y1)`` → the same box in model-input pixels, clipped to
        ``[0, size]`` (a box wholly outside the crop becomes empty: ``x1' <= x0'``)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        size = float(self.size)
        return (
            min(max(x0 * self.scale_x - self.left, 0.0), size),
            min(max(y0 * self.scale_y - self.top, 0.0), size),
            min(max(x1 * self.scale_x - self.left, 0.0), size),
            min(max(y1 * self.scale_y - self.top, 0.0), size),
        )


def to_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image (greyscale, RGBA and palette images converted).

    Raises:
        TypeError: when ``image`` is neither a PIL image nor a NumPy array.
        ValueError: for an array that is not ``(H, W)``, ``(H, W, 1|3|4)`` of dtype uint8.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must have dtype uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            return Image.fromarray(image, mode="L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return to_rgb_image(Image.fromarray(image))
        raise ValueError(f"image array must be (H, W) or (H, W, 1|3|4), got {image.shape}")
    raise TypeError(f"image must be a PIL image or a uint8 NumPy array, got {type(image).__name__}")


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize the shorter side to ``resize``, centre-crop ``size``, normalise ``(p - mean)/std``.

    Calling it on one image gives ``(3, size, size)``; on a sequence, ``(N, 3, size, size)``.
    """

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def crop_box(self, width: int, height: int) -> CropBox:
        """The crop of an original image of ``width × height`` pixels."""
        return CropBox.centre(width, height, self.size, self.resize)

    def __call__(
        self, image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]
    ) -> Tensor:
        if isinstance(image, (list, tuple)):
            return torch.stack([self(im) for im in image])
        rgb = to_rgb_image(image)  # type: ignore[arg-type]
        box = self.crop_box(*rgb.size)
        rgb = rgb.resize((box.resized_width, box.resized_height), Image.Resampling.BICUBIC)
        rgb = rgb.crop((box.left, box.top, box.left + self.size, box.top + self.size))
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Undo the normalisation: ``(…, 3, H, W)`` model input → pixel values in [0, 255]."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return (x * std + mean).clamp(0, 255)

    def to_original(self, maps: Tensor, width: int, height: int) -> Tensor:
        """Project maps ``(N, 1, size, size)`` at model resolution onto the original photo.

        Returns ``(N, 1, height, width)``; pixels outside the centre crop are 0.
        """
        box = self.crop_box(width, height)
        canvas = maps.new_zeros(maps.shape[0], maps.shape[1], box.resized_height, box.resized_width)
        canvas[..., box.top : box.top + self.size, box.left : box.left + self.size] = maps
        return F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False)
