"""evidencemap: maps of evidence for convolutional networks.

``explain(model, inputs, method="gradcam", target=None, layer=None, **options)`` returns an
:class:`Explanation`; the same methods are classes (``GradCAM(model)(inputs)``); ``methods()``
lists their names. Everything is torch on the inputs' device.
"""

from evidencemap import targets
from evidencemap.api import explain, get_method, methods
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
from evidencemap.methods.scorecam import ScoreCAM

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "CFCAM",
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
    "LayerCAM",
    "LayerMethod",
    "Method",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "XGradCAM",
    "__version__",
    "explain",
    "get_method",
    "methods",
    "targets",
]
