"""Reading the fields of ``POST /api/explain`` into an :class:`ExplainRequest`.

Every bad field is an :class:`~evidencemap.server.errors.ApiError` 400 naming it; each method
named is described once (:func:`evidencemap.methods.describe`) and its description travels with
the request, so nothing further down describes it again. Whether the options are valid for the
method, under the service's caps, is the service's check (:meth:`Service.prepare
<evidencemap.server.service.Service.prepare>`): it needs the caps and the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from evidencemap.methods import describe
from evidencemap.methods.registry import MethodSpec
from evidencemap.server.config import MAX_TOP_K
from evidencemap.server.errors import ApiError
from evidencemap.server.progress import check_request_id

__all__ = [
    "MAX_CLASSES",
    "ExplainRequest",
    "parse_int",
    "parse_methods",
    "parse_options",
    "parse_request_id",
    "read_explain_form",
]

MAX_CLASSES = 2**31
"""Classes a target may name when the model has no labels (the output then bounds it)."""
SCALARS = (type(None), bool, int, float, str)
"""Option values accepted in the page's JSON: scalars and (nested) lists of them."""


@dataclass(frozen=True)
class ExplainRequest:
    """The fields of one ``POST /api/explain``, read.

    Attributes:
        methods: each method's description, in request order (duplicates dropped).
        options: method name → its keyword options as sent (``layer`` included).
        target: the class to explain, or ``None``.
        top_k: explain the top-k classes, or ``None`` (neither: the top-1).
        request_id: the client's id for progress and cancel, or ``None``.
    """

    methods: tuple[MethodSpec, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: int | None = None
    top_k: int | None = None
    request_id: str | None = None


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated method names → their descriptions (request order, duplicates dropped)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ApiError(400, "method must name at least one method, e.g. 'gradcam'")
    specs: list[MethodSpec] = []
    for name in names:
        try:
            spec = describe(name)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if all(spec.cls is not seen.cls for seen in specs):
            specs.append(spec)
    return specs


def parse_int(text: str | None, name: str, low: int, high: int) -> int | None:
    """An optional form field holding an int in ``[low, high]``."""
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ApiError(
            400, f"{name} must be an integer from {low} to {high}, got {text!r}"
        ) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {value}")
    return value


def parse_options(text: str | None, specs: list[MethodSpec]) -> dict[str, dict[str, Any]]:
    """The ``options`` JSON → method name → keyword options.

    Either one object of options applied to every method (``{"top_k": 64}``), or an object
    keyed by method names whose values are objects (``{"scorecam": {"top_k": 64}}``).
    """
    if text is None or text.strip() == "":
        return {spec.name: {} for spec in specs}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"options must be a JSON object: {err}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"options must be a JSON object, got {type(parsed).__name__}")
    requested = {name: spec for spec in specs for name in (spec.name, *spec.aliases)}
    per_method = bool(parsed) and all(
        key.lower() in requested and isinstance(value, dict) for key, value in parsed.items()
    )
    if per_method:
        chosen = {requested[key.lower()].name: value for key, value in parsed.items()}
        return {spec.name: dict(chosen.get(spec.name, {})) for spec in specs}
    for key, value in parsed.items():
        if not _plain(value):
            raise ApiError(400, f"option {key!r} must be a number, string, boolean, null or list")
    return {spec.name: dict(parsed) for spec in specs}


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, SCALARS)


def parse_request_id(value: str) -> str:
    """A valid request id, else a 400 naming the allowed form."""
    try:
        return check_request_id(value)
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def read_explain_form(
    method: str,
    target: str | None,
    top_k: str | None,
    options: str | None,
    request_id: str | None,
    n_labels: int,
) -> ExplainRequest:
    """The form fields of ``POST /api/explain`` → an :class:`ExplainRequest`.

    Args:
        n_labels: the served model's class names (0: none; the output bounds the target).
    """
    specs = parse_methods(method)
    chosen = parse_int(target, "target", 0, (n_labels or MAX_CLASSES) - 1)
    k = parse_int(top_k, "top_k", 1, MAX_TOP_K)
    if chosen is not None and k is not None:
        raise ApiError(400, "give either target or top_k, not both")
    parsed = parse_options(options, specs)
    request_id = parse_request_id(request_id) if request_id is not None else None
    return ExplainRequest(tuple(specs), parsed, chosen, k, request_id)
