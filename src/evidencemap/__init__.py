"""evidencemap: maps of evidence for convolutional networks.

``explain(model, inputs, method="gradcam", target=None, layer=None, **options)`` returns an
:class:`Explanation`; the same methods are classes (``GradCAM(model)(inputs)``); ``methods()``
lists their names, ``describe(name)`` a method and its options, ``build(name, model, layer,
**options)`` makes an instance. Everything is torch on the inputs' device.

The subpackages ``models``, ``metrics``, ``evaluation``, ``runtime``, ``viz`` and ``io`` are
reachable as attributes (``evidencemap.models.load(...)``) and imported on first use.
"""

import importlib
import importlib.metadata
import sys
from typing import TYPE_CHECKING, Any

from evidencemap import runtime, targets
from evidencemap.api import build, describe, explain, get_method, methods
from evidencemap.explanation import Explanation
from evidencemap.methods import METHODS
from evidencemap.methods.base import FlatMapWarning, InputMethod, LayerMethod, Method

try:
    # Written once, in pyproject.toml; read from the installed package's metadata.
    __version__ = importlib.metadata.version("evidencemap")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

if not TYPE_CHECKING:
    # The subpackage evidencemap.methods, callable: ``methods()`` lists the names (as
    # evidencemap.api.methods does), and ``import evidencemap.methods.<module> as m`` works.
    methods = sys.modules["evidencemap.methods"]

__all__ = [
    "Explanation",
    "FlatMapWarning",
    "InputMethod",
    "LayerMethod",
    "Method",
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
    *sorted({cls.__name__ for cls in METHODS.values() if cls.__module__.startswith(__name__)}),
]

_LAZY = ("models", "metrics", "evaluation", "viz", "io", "training", "distributed")


def _method_classes() -> dict[str, type[Method]]:
    """The built-in method classes by class name (``evidencemap.GradCAM`` …), from the registry."""
    return {
        cls.__name__: cls for cls in METHODS.values() if cls.__module__.startswith(f"{__name__}.")
    }


def __getattr__(name: str) -> Any:
    """Import the subpackages of :data:`_LAZY` on first access (keeps ``import`` fast); the
    built-in method classes come from the registry (``from evidencemap import GradCAM``)."""
    if name in _LAZY:
        module = importlib.import_module(f"evidencemap.{name}")
        globals()[name] = module
        return module
    cls = _method_classes().get(name)
    if cls is not None:
        return cls
    raise AttributeError(f"module 'evidencemap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_method_classes()))
