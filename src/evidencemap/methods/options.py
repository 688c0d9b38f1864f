"""One description per method option: its type, default, range, meaning and cost.

Every method class lists its own options in ``OPTIONS`` (a tuple of :class:`Option`); its
bases list theirs, and :func:`options_of` merges them along the class's MRO. The same
description serves four readers:

* the constructors, which validate each value with :meth:`Option.check` (one message format:
  the option's name, what was expected, what was given);
* :func:`evidencemap.methods.build`, which rejects unknown option names with the list of the
  known ones, and applies caps;
* the command line's ``--option KEY=VALUE`` and ``evidencemap methods NAME``;
* the web service's ``GET /api/methods`` and its server-side caps: an option with
  ``cost="work"`` multiplies the run's time (iterations, samples, steps, channels), one with
  ``cost="chunk"`` sets how many inputs go through the model at once (memory), and ``cap`` is
  the largest value a shared service accepts by default; the one declared with ``passes=True``
  counts the method's model passes (:mod:`evidencemap.methods.passes`, the expected cost).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "BLUR_SIGMA",
    "MEMORY_BUDGET",
    "OPTION_KINDS",
    "Option",
    "OptionError",
    "batch_option",
    "options_of",
    "rename_deprecated",
    "report_value",
    "reported_options",
    "top_k_option",
    "warn_renamed",
]

OPTION_KINDS = ("int", "float", "bool", "str", "any")
"""``kind`` of an :class:`Option`: the JSON-level type of its value (``"any"``: checked by the
method itself, e.g. a tensor baseline or a module)."""


class OptionError(ValueError):
    """An option name a method does not take, or a value outside a cap."""


@dataclass(frozen=True)
class Option:
    """One keyword option of a method.

    Attributes:
        name: the keyword.
        kind: one of :data:`OPTION_KINDS`.
        default: the constructor's default.
        doc: one line: what it does.
        choices: the allowed values (strings) when the option is an enumeration.
        low / high: the allowed range of a number (``None``: unbounded), ``low_open`` /
            ``high_open`` for open ends.
        nullable: ``None`` is accepted too.
        other: description of the other Python values accepted (a tensor, a module …), which
            the method validates itself; empty when none.
        cost: ``"work"`` (time grows with the value), ``"chunk"`` (memory grows with the value)
            or ``""``.
        cap: the largest value a shared service accepts by default (``None``: no cap).
        renamed_from: former names of the option, still accepted with a ``DeprecationWarning``
            (:func:`rename_deprecated`).
        passes: the value is the number of model passes of a call, per class (a ``cost="work"``
            option; at most one per method; :mod:`evidencemap.methods.passes`).
        at_most: with ``passes``: the count is an upper bound (the method may stop earlier or
            skip some).
        passes_if_none: with ``passes``: what ``None`` counts — ``"channels"``, one pass per
            channel of the explained layer — or ``""`` (unknown).
        reported: whether :meth:`~evidencemap.methods.Method.options` (the options an
            :class:`~evidencemap.Explanation` records) lists the option; ``False`` for those that
            cannot change a result (chunk sizes, memory budgets, progress callbacks).
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    other: str = ""
    cost: str = ""
    cap: float | None = None
    renamed_from: tuple[str, ...] = ()
    passes: bool = False
    at_most: bool = False
    passes_if_none: str = ""
    reported: bool = True

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"Option kind must be one of {OPTION_KINDS}, got {self.kind!r}")
        if self.cost not in ("", "work", "chunk"):
            raise ValueError(f"Option cost must be '', 'work' or 'chunk', got {self.cost!r}")
        if self.passes and self.cost != "work":
            raise ValueError(f"Option {self.name!r}: passes=True needs cost='work'")
        if (self.at_most or self.passes_if_none) and not self.passes:
            raise ValueError(f"Option {self.name!r}: at_most and passes_if_none need passes=True")
        if self.passes_if_none not in ("", "channels"):
            raise ValueError(
                f"Option {self.name!r}: passes_if_none must be '' or 'channels', "
                f"got {self.passes_if_none!r}"
            )

    # -- validation ---------------------------------------------------------------------------
    def expected(self) -> str:
        """What the option accepts, in words (used in every error message)."""
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "int":
            text = "an int" + self._range()
        elif self.kind == "float":
            text = "a number" + self._range()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a string"
        else:
            text = self.other or "a value"
        if self.other and self.kind != "any":
            text += f", or {self.other}"
        if self.nullable:
            text += ", or None"
        return text

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f" {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f" {'<' if self.high_open else '<='} {_num(self.high)}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f" in {left}{_num(self.low)}, {_num(self.high)}{right}"

    def check(self, value: Any, owner: str = "") -> Any:
        """``value`` validated (ints accepted for floats, returned as ``float``).

        A value that is not of the option's ``kind`` is returned unchanged when the option
        accepts ``other`` values (a tensor, a module, ``'auto'`` …), for the method to validate.

        Raises:
            TypeError: for a value of the wrong type.
            ValueError: for a value outside the range or the choices.
        """
        label = f"{owner} option {self.name}" if owner else self.name
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise TypeError(f"{label} must be {self.expected()}, got None")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        matches = {
            "int": is_int,
            "float": is_int or isinstance(value, float),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "any": True,
        }[self.kind]
        if self.choices and isinstance(value, str):
            if value in self.choices:
                return value
            raise ValueError(f"{label} must be {self.expected()}, got {value!r}")
        if not matches or self.choices:
            if self.other:
                return value
            shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
            raise TypeError(f"{label} must be {self.expected()}, got {shown}")
        if self.kind in ("int", "float"):
            number = float(value)
            if not math.isfinite(number) or not self._in_range(number):
                raise ValueError(f"{label} must be {self.expected()}, got {value!r}")
            return int(value) if self.kind == "int" else number
        return value

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return not (
            self.high is not None
            and (number >= self.high if self.high_open else number > self.high)
        )

    def check_cap(self, value: Any, cap: float | None, owner: str = "") -> None:
        """Refuse a numeric ``value`` above ``cap`` (a service's limit).

        Raises:
            OptionError: when ``value > cap``.
        """
        if cap is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if value > cap:
            where = f"{owner} option " if owner else ""
            raise OptionError(
                f"{where}{self.name}={_num(value)} is over this service's cap of {_num(cap)}"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description (for ``GET /api/methods`` and ``evidencemap methods``)."""
        default = self.default
        if not isinstance(default, (type(None), bool, int, float, str)):
            default = repr(default)
        return {
            "name": self.name,
            "kind": self.kind,
            "default": default,
            "doc": self.doc,
            "expected": self.expected(),
            "choices": list(self.choices),
            "low": self.low,
            "high": self.high,
            "nullable": self.nullable,
            "cost": self.cost,
            "cap": self.cap,
            "passes": self.passes,
            "at_most": self.at_most,
            "passes_if_none": self.passes_if_none or None,
        }


MEMORY_BUDGET = Option(
    "memory_budget",
    "int",
    None,
    "bytes one chunk of perturbed inputs may take (None: no limit of its own)",
    low=1,
    nullable=True,
    reported=False,
)
"""The ``memory_budget`` option of the methods that size their own chunks (Score-CAM,
Integrated Gradients, SmoothGrad: ``Method.sizes_own_chunks``)."""


BLUR_SIGMA = Option(
    "blur_sigma", "float", 10.0, "σ in pixels of the blur baseline", low=0.0, low_open=True
)
"""The ``blur_sigma`` option of the methods whose reference may be a blurred input
(``baseline="blur"``: Integrated Gradients, DeepLIFT, the path attributions, the perturbations)."""


def batch_option(default: int | None, text: str, cap: int = 256) -> Option:
    """The ``internal_batch_size`` option: ``default`` inputs per pass (``text`` says which;
    ``None``: the method picks one per device, and ``None`` is then accepted), at least 1 and at
    most ``cap``; a chunk size, so it is not reported with the map."""
    return Option(
        "internal_batch_size",
        "int",
        default,
        text,
        low=1,
        nullable=default is None,
        cost="chunk",
        cap=cap,
        reported=False,
    )


def top_k_option(text: str) -> Option:
    """The ``top_k`` option of the channel-scoring CAMs: only the ``k`` channels of highest
    activation variance are scored (``text`` says at what cost each); ``None`` scores all
    channels, so the passes it costs are at most ``min(k, channels)``."""
    return Option(
        "top_k",
        "int",
        None,
        text,
        low=1,
        nullable=True,
        cost="work",
        cap=4096,
        passes=True,
        at_most=True,
        passes_if_none="channels",
    )


def options_of(cls: type) -> dict[str, Option]:
    """Every option of method class ``cls``: its ``OPTIONS`` and its bases', subclass first.

    A subclass's entry replaces a base's entry of the same name (e.g. a different default).
    A keyword parameter of a constructor in the chain that no ``OPTIONS`` describes (a method
    written outside the library that lists none) is described from the signature alone, as
    kind ``"any"`` with its default, so that it still can be passed. A parameter that keeps a
    renamed option's former name (:attr:`Option.renamed_from`) is not an option of its own.

    Worked out once per class (the result is a fresh copy of the cached description).
    """
    return dict(_options_of(cls))


@functools.cache
def _options_of(cls: type) -> dict[str, Option]:
    """:func:`options_of`, cached per class (classes are hashable; callers must not mutate)."""
    found: dict[str, Option] = {}
    for klass in cls.__mro__:
        for option in klass.__dict__.get("OPTIONS", ()):
            found.setdefault(option.name, option)
    former = {old for option in found.values() for old in option.renamed_from}
    for name, default in _signature_options(cls).items():
        if name not in found and name not in former:
            found[name] = Option(name, "any", default, "(not described)", other="a value")
    return found


def reported_options(cls: type) -> tuple[Option, ...]:
    """The options of ``cls`` that its report lists (:attr:`Option.reported`): those described in
    an ``OPTIONS`` of the class or a base (not the signature-only ones), base classes first, in
    the order each ``OPTIONS`` lists them (worked out once per class)."""
    return _reported_options(cls)


@functools.cache
def _reported_options(cls: type) -> tuple[Option, ...]:
    final = _options_of(cls)
    found: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        for option in klass.__dict__.get("OPTIONS", ()):
            current = final.get(option.name)
            if current is not None and current.reported and option.name not in found:
                found[option.name] = current
    return tuple(found.values())


def report_value(value: Any) -> Any:
    """An option's value as a report lists it: a tensor as ``"tensor"``, a set as its sorted
    list, a tuple as a list; anything else as it is."""
    if isinstance(value, Tensor):
        return "tensor"
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _signature_options(cls: type) -> dict[str, Any]:
    """Keyword parameters (with defaults) of the ``__init__`` chain of ``cls``, while each
    passes ``**kw`` on to its base."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        for param in params:
            if param.name in ("self", "model", "layer") or param.kind in (
                param.VAR_KEYWORD,
                param.VAR_POSITIONAL,
            ):
                continue
            found.setdefault(
                param.name, None if param.default is inspect.Parameter.empty else param.default
            )
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def warn_renamed(old: str, new: str, owner: str = "", stacklevel: int = 3) -> None:
    """Issue the ``DeprecationWarning`` of option ``old``, now called ``new``."""
    where = f"{owner} option" if owner else "option"
    warnings.warn(
        f"{where} {old!r} is deprecated: it is now spelled {new!r}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def rename_deprecated(
    options: Mapping[str, Any], known: Mapping[str, Option], owner: str = ""
) -> dict[str, Any]:
    """``options`` with every former option name (:attr:`Option.renamed_from`) replaced by the
    current one, each with a ``DeprecationWarning``; other names are kept as they are.

    Raises:
        OptionError: when an option is given under both its former and its current name.
    """
    former = {old: option.name for option in known.values() for old in option.renamed_from}
    out: dict[str, Any] = {}
    for name, value in options.items():
        new = former.get(name) if name not in known else None
        if new is None:
            out[name] = value
            continue
        if new in options:
            where = f"{owner} " if owner else ""
            raise OptionError(f"{where}got both {new!r} and its former name {name!r}")
        warn_renamed(name, new, owner, stacklevel=4)
        out[new] = value
    return out


def check_caps(
    options: Mapping[str, Any], known: Mapping[str, Option], caps: Mapping[str, float], owner: str
) -> None:
    """Apply ``caps`` (option name → largest value; default: each option's own ``cap``)."""
    for name, value in options.items():
        option = known.get(name)
        if option is None or not option.cost:
            continue
        option.check_cap(value, caps.get(name, option.cap), owner)


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"
