"""Tiny deterministic models, the model-state snapshot and real photos for the CF-CAM and
gradient-method tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny import ConvGapFc

torch.set_num_threads(2)


class SmallNet(ConvGapFc):
    """:class:`tiny.ConvGapFc` 8 channels wide (conv → ReLU → conv → ReLU → GAP → linear)."""

    def __init__(
        self,
        dims: int = 2,
        channels: int = 3,
        width: int = 8,
        classes: int = 4,
        inplace: bool = False,
    ) -> None:
        super().__init__(dims, channels, width, classes, inplace)


class ControlledLayer(nn.Module):
    """The explained layer's output IS the input (``layer`` = identity), followed by a linear
    read-out of the flattened activations: ``y_c = Σ_{k,p} U[c, k, p] A_{k,p}``, so
    ``∂y_c/∂A = U[c]`` exactly."""

    def __init__(self, readout: Tensor) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.readout = nn.Parameter(readout.clone())  # (classes, K, *s)

    def forward(self, x: Tensor) -> Tensor:
        a = self.layer(x)
        return a.flatten(1) @ self.readout.flatten(1).T


class ReLU6AsReLU(nn.ReLU):
    """ReLU6 that Captum's guided backprop recognises (it only hooks ``nn.ReLU`` modules)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


def captum_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.ReLU6`` modules are :class:`ReLU6AsReLU` (same function)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, ReLU6AsReLU())
    return twin.eval()


def load_photos(model: nn.Module, names: tuple[str, ...] = ("chelsea", "coffee")) -> Tensor:
    """Real photos from scikit-image, preprocessed for the built-in model, ``(N, 3, 224, 224)``."""
    from skimage import data

    return torch.stack([model.preprocess(getattr(data, n)()) for n in names])  # type: ignore[operator]
