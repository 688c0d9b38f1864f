"""Every method of the library, registered by name in :data:`METHODS`.

:func:`build` is the one factory (name, model, layer, options → instance), :func:`describe`
the one description of a method and its options (:class:`Option`).
"""

from evidencemap.methods import (
    attention,  # noqa: F401  (registers the attention methods)
    cam,
    cfcam,
    fgvis,
    gradients,
    scorecam,
)
from evidencemap.methods.base import METHODS, Context, LayerMethod, Method, register
from evidencemap.methods.options import Option, OptionError, options_of
from evidencemap.methods.registry import MethodSpec, build, describe, get_method, method_names

__all__ = [
    "METHODS",
    "Context",
    "LayerMethod",
    "Method",
    "MethodSpec",
    "Option",
    "OptionError",
    "build",
    "cam",
    "cfcam",
    "describe",
    "fgvis",
    "get_method",
    "gradients",
    "method_names",
    "options_of",
    "register",
    "scorecam",
]
