"""The methods by name: look one up, describe it, build it — the one factory every entry point uses.

``build(name, model, layer=None, **options)`` is what :func:`evidencemap.explain`, the command
line, the web service, the evaluation and SmoothGrad's wrapped method all call:

* the name is resolved case-insensitively (aliases too);
* every option name is checked against the method's description (:func:`describe`), and an
  unknown one is an :class:`~evidencemap.methods.options.OptionError` listing the known ones
  (a former name of a renamed option works, with a ``DeprecationWarning``);
* with ``caps``, every costly option is refused above its cap (:meth:`Option.check_cap`);
* ``layer`` is passed to methods that take one and refused by the others.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from evidencemap.checks import ModelLike
from evidencemap.layers import LayerSpec
from evidencemap.methods.base import Method
from evidencemap.methods.options import (
    Option,
    OptionError,
    check_caps,
    options_of,
    rename_deprecated,
)
from evidencemap.methods.passes import PassCount, Passes, declared_passes

__all__ = [
    "METHODS",
    "MethodSpec",
    "TransferModels",
    "applicable_methods",
    "build",
    "check_method_supports",
    "describe",
    "get_method",
    "installed_transfer_models",
    "method_names",
    "register",
    "register_transfer_models",
    "unsupported_reason",
]

METHODS: dict[str, type[Method]] = {}
"""Every registered method class by name and alias (lower case), in registration order."""

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name`` (and its aliases).

    That is all a new method needs: :func:`evidencemap.methods`, :func:`describe`,
    :func:`build`, :func:`evidencemap.explain`, the command line and the web service find it
    here (built-in method modules in :mod:`evidencemap.methods` are imported automatically).

    Raises:
        TypeError: for a class that is not a :class:`Method` or has no ``name``.
        ValueError: for a name or alias another class already holds.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register takes a Method subclass, got {cls!r}")
    if not cls.name:
        raise TypeError(f"method class {cls.__name__} needs a name (the class attribute name)")
    for name in (cls.name, *cls.aliases):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice")
    for name in (cls.name, *cls.aliases):
        METHODS[name] = cls
    return cls


TransferModels = Callable[[], list[tuple[str, nn.Module]]]
"""A source of FGVis' transfer models: ``() → [(name, module), …]``."""

_TRANSFER_SOURCES: list[TransferModels] = []


def register_transfer_models(source: TransferModels) -> TransferModels:
    """Add a source of the models FGVis' ``transfer="installed"`` checks a mask against.

    Packages declare theirs as an entry point of the group :data:`TRANSFER_ENTRY_POINTS`
    (evidencemap itself: :func:`evidencemap.models.installed_transfer_models`, the built-in
    EfficientNet-Lite1/Lite2 when their weights are installed); this adds one at run time.
    Methods never import the model zoo.
    """
    if source not in _TRANSFER_SOURCES:
        _TRANSFER_SOURCES.append(source)
    return source


TRANSFER_ENTRY_POINTS = "evidencemap.transfer_models"
"""The entry-point group of functions ``() -> [(name, module)]`` giving transfer models."""


def installed_transfer_models() -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every transfer-model source: the entry points of the group
    :data:`TRANSFER_ENTRY_POINTS` (loaded on first use), then those added with
    :func:`register_transfer_models`."""
    declared = importlib.metadata.entry_points(group=TRANSFER_ENTRY_POINTS)
    sources = [*(ep.load() for ep in declared), *_TRANSFER_SOURCES]
    return [found for source in dict.fromkeys(sources) for found in source()]


def method_names() -> list[str]:
    """The canonical name of every method (aliases not included), in registration order."""
    return list(dict.fromkeys(cls.name for cls in METHODS.values()))


def get_method(name: str | type[Method]) -> type[Method]:
    """The method class registered as ``name`` (case-insensitive; a class is returned as is).

    Raises:
        TypeError: when ``name`` is neither a string nor a method class.
        ValueError: for an unknown name (the message lists the known ones).
    """
    if isinstance(name, type) and issubclass(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return cls


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and takes.

    Attributes:
        name: canonical name. aliases: other accepted names.
        cls: the class.
        uses_layer: whether it takes a ``layer``.
        summary: the first line of its documentation.
        options: option name → :class:`Option`, in the order the constructor lists them.
        forwards_to: the option naming a wrapped method whose options it also takes
            (SmoothGrad's ``method``), or ``""``.
        passes: its declared cost in model passes (:mod:`evidencemap.methods.passes`).
    """

    KINDS: ClassVar[dict[str, str]] = {
        "layer": "explains a layer's activations",
        "input": "works on the input",
        "attention": "reads a transformer's token attention",
        "wrapper": "wraps another method",
    }

    name: str
    aliases: tuple[str, ...]
    cls: type[Method]
    uses_layer: bool
    summary: str
    options: dict[str, Option]
    forwards_to: str = ""
    passes: Passes = field(default_factory=Passes)

    @property
    def kind(self) -> str:
        """What the method reads, from its declared capabilities (a key of :attr:`KINDS`):
        ``"wrapper"`` (it forwards options to a wrapped method), ``"attention"``
        (``needs_attention``), ``"layer"`` (``uses_layer``) or ``"input"``."""
        if self.forwards_to:
            return "wrapper"
        if self.cls.needs_attention:
            return "attention"
        return "layer" if self.uses_layer else "input"

    def pass_count(self, channels: int | None = None) -> PassCount:
        """Model passes per class with the default options, derived from :attr:`passes`.

        ``passes_per_call × the counting option's default × the wrapped method's passes``
        (each 1 when not declared); the kind is the wrapped method's, if any.

        Args:
            channels: channels of the explained layer, for a counting option whose ``None``
                means one pass per channel (``None``: unknown).

        Raises:
            ValueError: when wrapped methods name each other in a cycle.
        """
        return self._pass_count(channels, ())

    def _pass_count(self, channels: int | None, seen: tuple[str, ...]) -> PassCount:
        if self.name in seen:
            raise ValueError(f"wrapped methods form a cycle: {' → '.join((*seen, self.name))}")
        declared = self.passes
        count = declared.per_call
        kind, at_most = declared.kind, declared.at_most
        if declared.option:
            value = self.options[declared.option].default
            if value is None and declared.if_none == "channels":
                value = channels
            if value is None:
                return PassCount(None, kind, at_most)
            count *= float(value)
        wrapped = self.options[declared.wraps].default if declared.wraps else None
        if not isinstance(wrapped, str):  # nothing wrapped, or an instance: its own kind
            return PassCount(count, kind, at_most)
        inner = describe(wrapped)._pass_count(channels, (*seen, self.name))
        total = None if inner.passes is None else count * inner.passes
        return PassCount(total, inner.kind, at_most or inner.at_most)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe description (``GET /api/methods``)."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "uses_layer": self.uses_layer,
            "summary": self.summary,
            "options": {name: option.describe() for name, option in self.options.items()},
            "forwards_to": self.forwards_to,
            "kind": self.kind,
            "passes": self.passes.to_json(),
        }


def describe(method: str | type[Method]) -> MethodSpec:
    """The :class:`MethodSpec` of a method name or class.

    Raises:
        TypeError / ValueError: from :func:`get_method`, or for a bad cost declaration
            (:func:`~evidencemap.methods.passes.declared_passes`).
    """
    cls = get_method(method)
    doc = inspect.getdoc(cls) or ""
    summary = doc.strip().splitlines()[0].replace("``", "").rstrip(":") if doc else ""
    options = options_of(cls)
    return MethodSpec(
        name=cls.name,
        aliases=tuple(cls.aliases),
        cls=cls,
        uses_layer=cls.uses_layer,
        summary=summary,
        options=options,
        forwards_to=getattr(cls, "forwards_options_to", ""),
        passes=declared_passes(cls, options),
    )


def check_options(
    spec: MethodSpec, options: Mapping[str, Any], caps: Mapping[str, float] | None = None
) -> None:
    """Refuse unknown option names and (with ``caps``) values over the caps.

    A method that forwards options (SmoothGrad) has the remaining ones checked against the
    wrapped method's description.

    A former option name (:attr:`Option.renamed_from`) is checked as the current one, with a
    ``DeprecationWarning``.

    Raises:
        OptionError: for an unknown name or a value over its cap.
        TypeError / ValueError: from :meth:`Option.check`, for a value of the wrong kind.
    """
    known = spec.options
    options = rename_deprecated(options, known, f"method {spec.name!r}")
    unknown = [name for name in options if name not in known]
    if spec.forwards_to and unknown:
        inner_name = options.get(spec.forwards_to) or known[spec.forwards_to].default
        for alias in spec.cls.wrap_aliases:
            if isinstance(inner_name, str) and options.get(alias):
                inner_name = options[alias]
        if isinstance(inner_name, str):
            inner = describe(inner_name)
            try:
                check_options(inner, {n: options[n] for n in unknown}, caps)
            except OptionError as err:
                raise OptionError(
                    f"method {spec.name!r} takes no option {', '.join(map(repr, unknown))} of "
                    f"its own, and: {err}"
                ) from None
            unknown = []
    if unknown:
        listed = ", ".join(known) or "none"
        raise OptionError(
            f"method {spec.name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options: {listed}"
        )
    problems: list[Exception] = []
    for name, value in options.items():
        if name in known:
            try:
                known[name].check(value, f"method {spec.name!r}")
            except (TypeError, ValueError) as err:
                problems.append(err)
    if problems:  # every bad value named at once, with the first one's type
        raise type(problems[0])("; ".join(str(p) for p in problems))
    if caps is not None:
        check_caps(options, known, caps, f"method {spec.name!r}")


def build(
    method: str | type[Method],
    model: nn.Module | ModelLike,
    layer: LayerSpec = None,
    *,
    caps: Mapping[str, float] | None = None,
    **options: Any,
) -> Method:
    """An instance of ``method`` on ``model`` with ``options``.

    Args:
        method: a name from :func:`method_names` (aliases accepted) or a method class.
        model: the model: an ``nn.Module`` or a :class:`~evidencemap.models.LoadedModel`.
        layer: for methods that take one: a module, a dotted name or a list of them.
        caps: option name → the largest value accepted (``{}``: each option's default cap;
            ``None``: no caps).
        **options: the method's options (see :func:`describe`).

    Raises:
        OptionError: for an unknown option or one over its cap (a ``ValueError``).
        TypeError / ValueError: for a bad value or a layer given to an input-space method.
    """
    spec = describe(method)
    options = rename_deprecated(options, spec.options, f"method {spec.name!r}")
    check_options(spec, options, caps)
    if spec.uses_layer:
        return spec.cls(model, layer, **options)  # type: ignore[call-arg, arg-type]
    if layer is not None:
        raise ValueError(f"method {spec.name!r} works in input space and takes no layer")
    return spec.cls(model, **options)


def _module_of(model: nn.Module | ModelLike) -> tuple[nn.Module, bool]:
    """The bare module and whether it is compiled (TorchScript)."""
    module = model if isinstance(model, nn.Module) else model.module
    compiled = getattr(model, "source", "") == "torchscript" or isinstance(
        module, torch.jit.ScriptModule
    )
    return module, compiled


def unsupported_reason(
    method: str | type[Method] | Method, model: nn.Module | ModelLike
) -> str | None:
    """Why ``method`` cannot explain ``model``, or ``None`` when it can (a static check).

    ``method`` is a name, a class or an instance (an instance answers for what it wraps:
    SmoothGrad over an input-space method hooks no layer). Each class declares its own rule
    (:meth:`Method.unsupported`).
    """
    module, compiled = _module_of(model)
    if isinstance(method, Method):
        if compiled and method.hooks_layers:
            return "it reads a layer through forward hooks, which TorchScript models never run"
        return type(method).unsupported(module, compiled=False)
    return get_method(method).unsupported(module, compiled=compiled)


def applicable_methods(model: nn.Module | ModelLike) -> dict[str, str | None]:
    """Every registered method → ``None`` when it applies to ``model``, else the reason why not."""
    return {name: unsupported_reason(name, model) for name in method_names()}


def check_method_supports(
    model: nn.Module | ModelLike, method: str | type[Method] | Method
) -> None:
    """Raise a clear error when ``method`` (a name, class or instance) cannot explain ``model``.

    Raises:
        ValueError: naming the method, the reason and the methods that do apply.
    """
    reason = unsupported_reason(method, model)
    if reason is None:
        return
    name = method if isinstance(method, str) else getattr(method, "name", method)
    usable = [n for n, why in applicable_methods(model).items() if why is None]
    suggestion = f"methods that apply: {', '.join(usable)}" if usable else "no method applies"
    extra = ""
    if "TorchScript" in reason:
        extra = (
            "; or save the model as a pickled eager model (torch.save(model, path)) or give "
            "an import string package.module:factory"
        )
    raise ValueError(
        f"method {name!r} cannot explain {getattr(model, 'name', 'this model')!s}: {reason} ({suggestion}{extra})"
    )
