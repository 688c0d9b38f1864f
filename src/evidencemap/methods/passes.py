"""What one call of a method costs, in model passes per explained class, as the method declares it.

A method class declares its cost next to its options, and every reader (the web service's
expected cost, ``evidencemap methods``) derives the count from that declaration alone:

* ``pass_kind`` (class attribute): the kind of one pass, one of :data:`PASS_KINDS` — ``"layer"``
  (one Grad-CAM call: a forward, and a backward from the explained layer only), ``"input"`` (one
  saliency call: a forward and a full backward to the input) or ``"forward"`` (a forward
  without gradients). Defaults: ``"input"`` on :class:`~evidencemap.methods.Method`,
  ``"layer"`` on :class:`~evidencemap.methods.LayerMethod`.
* ``passes_per_call`` (class attribute, default 1): passes per call and class (guided Grad-CAM:
  2, a guided and a plain one), multiplied by the counting option's value when there is one.
* the counting option: the one ``cost="work"`` :class:`~evidencemap.methods.Option` declared
  with ``passes=True`` (Integrated Gradients ``steps``); ``at_most=True`` when its value is an
  upper bound (FGVis ``max_iterations``: it stops when the score plateaus; Score-CAM ``top_k``:
  constant channels cost nothing), ``passes_if_none="channels"`` when ``None`` means one pass
  per channel of the explained layer (Score-CAM's default ``top_k=None``).
* ``forwards_options_to`` (class attribute, default ``""``): the option naming a wrapped method
  (SmoothGrad's ``method``, whose options it also takes), which each counted pass calls once:
  the count is multiplied by that method's passes and takes its kind (and its upper bound).

So ``passes = passes_per_call × value of the counting option × passes of the wrapped method``,
each factor 1 when not declared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from evidencemap.methods.options import Option

__all__ = ["PASS_KINDS", "PASS_UNITS", "PassCount", "Passes", "declared_passes"]

PASS_KINDS = ("layer", "input", "forward")
"""The kinds of model pass a method's cost is counted in (see the module docstring)."""
PASS_UNITS = {"layer": "gradcam", "input": "saliency", "forward": ""}
"""What one pass of each kind is, as a method timed with its default options (``""``: a plain
forward without gradients): the web service times these on its model."""


class PassCount(NamedTuple):
    """The passes per class of a method with its default options.

    Attributes:
        passes: the count (``None`` when it depends on something unknown: the channels of the
            layer, or a wrapped method given as an instance).
        kind: one of :data:`PASS_KINDS`.
        at_most: ``passes`` is an upper bound.
    """

    passes: float | None
    kind: str
    at_most: bool


@dataclass(frozen=True)
class Passes:
    """A method's declared cost (see the module docstring), as :func:`declared_passes` reads it.

    Attributes:
        kind: ``pass_kind``, one of :data:`PASS_KINDS`.
        per_call: ``passes_per_call``.
        option: the counting option's name (``""``: none).
        at_most: its count is an upper bound.
        if_none: what its ``None`` counts (``"channels"``) or ``""``.
        wraps: ``forwards_options_to`` (``""``: none).
    """

    kind: str = "input"
    per_call: float = 1.0
    option: str = ""
    at_most: bool = False
    if_none: str = ""
    wraps: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe description (``MethodSpec.to_json``)."""
        return {
            "kind": self.kind,
            "per_call": self.per_call,
            "option": self.option or None,
            "at_most": self.at_most,
            "if_none": self.if_none or None,
            "wraps": self.wraps or None,
        }


def declared_passes(cls: type, options: Mapping[str, Option]) -> Passes:
    """The cost method class ``cls`` declares, with its ``options`` (:func:`options_of`).

    Raises:
        ValueError: for a ``pass_kind`` not in :data:`PASS_KINDS`, a ``passes_per_call`` that
            is not a positive number, more than one counting option, or a
            ``forwards_options_to`` that names no option of the method.
    """
    owner = cls.__name__
    kind = getattr(cls, "pass_kind", "input")
    if kind not in PASS_KINDS:
        raise ValueError(f"{owner}.pass_kind must be one of {PASS_KINDS}, got {kind!r}")
    per_call = getattr(cls, "passes_per_call", 1.0)
    if (
        isinstance(per_call, bool)
        or not isinstance(per_call, (int, float))
        or not math.isfinite(per_call)
        or per_call <= 0
    ):
        raise ValueError(f"{owner}.passes_per_call must be a positive number, got {per_call!r}")
    counting = [option for option in options.values() if option.passes]
    if len(counting) > 1:
        names = ", ".join(repr(option.name) for option in counting)
        raise ValueError(f"{owner} declares more than one option with passes=True: {names}")
    wraps = getattr(cls, "forwards_options_to", "")
    if wraps and wraps not in options:
        raise ValueError(
            f"{owner}.forwards_options_to names no option of the method: {wraps!r}; its "
            f"options: {', '.join(options) or 'none'}"
        )
    option = counting[0] if counting else None
    return Passes(
        kind=kind,
        per_call=float(per_call),
        option=option.name if option is not None else "",
        at_most=option.at_most if option is not None else False,
        if_none=option.passes_if_none if option is not None else "",
        wraps=wraps,
    )
