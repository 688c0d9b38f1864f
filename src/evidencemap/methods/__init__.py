"""Every method of the library, registered by name in :data:`METHODS`."""

from evidencemap.methods import cam, cfcam, fgvis, gradients, scorecam
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
