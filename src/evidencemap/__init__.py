"""evidencemap: maps of evidence for convolutional networks.

``explain(model, inputs, method="gradcam", target=None, layer=None, **options)`` returns an
:class:`Explanation`; the same methods are classes (``GradCAM(model)(inputs)``); ``methods()``
lists their names, ``describe(name)`` a method and its options, ``build(name, model, layer,
**options)`` makes an instance. Everything is torch on the inputs' device.

The subpackages ``models``, ``metrics``, ``evaluation``, ``runtime``, ``viz`` and ``io`` are
reachable as attributes (``evidencemap.models.load(...)``) and imported on first use.
"""

import importlib
from typing import Any

from evidencemap import runtime, targets
from evidencemap.api import build, describe, explain, get_method, methods
from evidencemap.explanation import Explanation
from evidencemap.methods.attention import AttentionGradient, AttentionRollout
from evidencemap.methods.base import LayerMethod, Method
from evidencemap.methods.cam import (
    CAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from evidencemap.methods.cfcam import CFCAM
from evidencemap.methods.fgvis import FGVis
from evidencemap.methods.gradients import (
    GuidedBackprop,
    GuidedGradCAM,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from evidencemap.methods.perturbation import RISE, Occlusion
from evidencemap.methods.scorecam import ScoreCAM
from evidencemap.methods.surrogate import KernelShap, Lime

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "CFCAM",
    "RISE",
    "AttentionGradient",
    "AttentionRollout",
    "EigenCAM",
    "Explanation",
    "FGVis",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "KernelShap",
    "LayerCAM",
    "LayerMethod",
    "Lime",
    "Method",
    "Occlusion",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "XGradCAM",
    "__version__",
    "build",
    "describe",
    "evaluation",
    "explain",
    "get_method",
    "io",
    "methods",
    "metrics",
    "models",
    "runtime",
    "targets",
    "viz",
]

_LAZY = ("models", "metrics", "evaluation", "viz", "io", "training", "distributed")


def __getattr__(name: str) -> Any:
    """Import the subpackages of :data:`_LAZY` on first access (keeps ``import`` fast)."""
    if name in _LAZY:
        module = importlib.import_module(f"evidencemap.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'evidencemap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
