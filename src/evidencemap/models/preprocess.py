"""Image preprocessing of the built-in models, and the way back from model input to the photo.

Pixels in, tensors out: a PIL image or a uint8 array is resized so its shorter side is
``resize`` (bicubic), centre-cropped to ``size × size`` and normalised as
``(pixel - mean) / std``. :meth:`ImagePreprocessor.to_original` projects a map made at the model's
input resolution back onto the original photo, so overlays line up with what the user gave.
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
    """Where the model's input crop lies in the resized image and how that was scaled.

    ``scale`` maps original pixels to resized pixels; ``(left, top)`` is the crop's corner in the
    resized image and ``size`` its side.
    """

    scale: float
    left: int
    top: int
    size: int


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
        scale = self.resize / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        return CropBox(scale, (new_w - self.size) // 2, (new_h - self.size) // 2, self.size)

    def __call__(
        self, image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]
    ) -> Tensor:
        if isinstance(image, (list, tuple)):
            return torch.stack([self(im) for im in image])
        rgb = to_rgb_image(image)  # type: ignore[arg-type]
        box = self.crop_box(*rgb.size)
        new_w = max(self.size, round(rgb.width * box.scale))
        new_h = max(self.size, round(rgb.height * box.scale))
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
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
        new_w = max(self.size, round(width * box.scale))
        new_h = max(self.size, round(height * box.scale))
        canvas = maps.new_zeros(maps.shape[0], maps.shape[1], new_h, new_w)
        canvas[..., box.top : box.top + self.size, box.left : box.left + self.size] = maps
        return F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False)
