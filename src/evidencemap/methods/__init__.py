"""Every method of the library, registered by name in :data:`METHODS`."""

from evidencemap.methods import (
    attention,  # noqa: F401  (registers the attention methods)
    cam,
    cfcam,
    fgvis,
    gradients,
    scorecam,
)
from evidencemap.methods.base import METHODS, Context, LayerMethod, Method, register

__all__ = [
    "METHODS",
    "Context",
    "LayerMethod",
    "Method",
    "cam",
    "cfcam",
    "fgvis",
    "gradients",
    "register",
    "scorecam",
]
