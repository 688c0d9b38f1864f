"""Every method of the library, registered by name in :data:`METHODS`.

:func:`build` is the one factory (name, model, layer, options → instance), :func:`describe`
the one description of a method, its options (:class:`Option`) and its cost in model passes
(:class:`Passes`, :mod:`evidencemap.methods.passes`).
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
from evidencemap.methods.passes import PASS_KINDS, PassCount, Passes
from evidencemap.methods.registry import MethodSpec, build, describe, get_method, method_names

__all__ = [
    "METHODS",
    "PASS_KINDS",
    "Context",
    "LayerMethod",
    "Method",
    "MethodSpec",
    "Option",
    "OptionError",
    "PassCount",
    "Passes",
    "ablationcam",
    "build",
    "cam",
    "cfcam",
    "describe",
    "elementwise",
    "fgvis",
    "get_method",
    "gradients",
    "method_names",
    "options_of",
    "register",
    "scorecam",
    "smoothcams",
]

# The CAM variants register after the rest (the order methods are listed in).
from evidencemap.methods import ablationcam, elementwise, smoothcams
