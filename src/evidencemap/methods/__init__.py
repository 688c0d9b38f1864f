"""Every method of the library, registered by name in :data:`METHODS`.

:func:`build` is the one factory (name, model, layer, options → instance), :func:`describe`
the one description of a method, its options (:class:`Option`) and its cost in model passes
(:class:`Passes`, :mod:`evidencemap.methods.passes`).

Layout: :mod:`~evidencemap.methods.registry` (names, :func:`register`, the factory),
:mod:`~evidencemap.methods.call` (the call path: chunks, memory budget, packaging),
:mod:`~evidencemap.methods.base` (the templates :class:`Method`, :class:`LayerMethod`,
:class:`InputMethod`), :mod:`~evidencemap.methods.options` (option descriptions and shared
options), and one module per family of methods. Every module and subpackage of this package
is imported here, so a new method module registers itself by being in the folder.
"""

import importlib
import pkgutil
import sys
import types

from evidencemap.methods.base import Context, FlatMapWarning, InputMethod, LayerMethod, Method
from evidencemap.methods.options import Option, OptionError, options_of
from evidencemap.methods.passes import PASS_KINDS, PassCount, Passes
from evidencemap.methods.registry import (
    METHODS,
    MethodSpec,
    build,
    describe,
    get_method,
    method_names,
    register,
)

__all__ = [
    "METHODS",
    "PASS_KINDS",
    "Context",
    "FlatMapWarning",
    "InputMethod",
    "LayerMethod",
    "Method",
    "MethodSpec",
    "Option",
    "OptionError",
    "PassCount",
    "Passes",
    "build",
    "describe",
    "get_method",
    "method_names",
    "options_of",
    "register",
]

# The method modules register their classes on import: the registration order, which lists
# follow (the page, `evidencemap methods`, evaluation tables). The first families keep their
# places; every other module in the folder follows, sorted by name.
_FIRST = ("attention", "cam", "cfcam", "fgvis", "gradients", "scorecam")
for _name in [*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__))]:
    importlib.import_module(f"{__name__}.{_name}")


class _CallablePackage(types.ModuleType):
    """This package, callable as ``evidencemap.methods()`` (the names of every method).

    ``evidencemap.methods`` names both this package and the listing function
    (:func:`evidencemap.api.methods`); a plain function bound there would hide the package
    from ``import evidencemap.methods.fgvis.diagnostics as d``, which looks each dotted name
    up as an attribute. The package itself answers the call instead.
    """

    def __call__(self) -> list[str]:
        return method_names()


sys.modules[__name__].__class__ = _CallablePackage
