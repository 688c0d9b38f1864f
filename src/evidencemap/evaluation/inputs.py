"""What an evaluation is given, checked: images, boxes, methods and their options.

The methods evaluated by default are those that apply to the model
(:func:`evidencemap.methods.registry.applicable_methods`); the others are left out with the
reason. Quick mode gives slow methods the options of :data:`QUICK_METHOD_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from evidencemap.methods import METHODS, build, describe, get_method
from evidencemap.methods import method_names as registered_methods
from evidencemap.methods.registry import unsupported_reason
from evidencemap.metrics.common import Explainer
from evidencemap.models.preprocess import CropBox

__all__ = ["QUICK_METHOD_OPTIONS", "make_explainer", "select_methods", "to_input_boxes"]

QUICK_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "scorecam": {"top_k": 32},
    "sscam": {"top_k": 32, "samples": 4},
    "iscam": {"top_k": 32, "samples": 4},
    "rise": {"masks": 500},
    "lime": {"samples": 200},
    "kernel_shap": {"samples": 200},
    "fgvis": {"max_iterations": 40},
    "extremal_perturbation": {"max_iterations": 40},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 8},
}
"""Constructor options quick mode gives a method (canonical name → options), the one place they
live. An option the method's constructor does not take is left out, so the table may name
methods that are not registered; ``method_options`` given to :func:`evaluate` win."""


def make_explainer(
    model: nn.Module, method: str, options: Mapping[str, Any] | None = None
) -> Explainer:
    """The method ``method`` bound to ``model`` with ``options`` (``layer`` included).

    Raises:
        ValueError: for an unknown method name or option (:func:`evidencemap.methods.build`).
    """
    opts = dict(options or {})
    return build(method, model, opts.pop("layer", None), **opts)


def select_methods(
    model: nn.Module, methods: Any
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``(methods to run, left out → reason, refused → reason)`` for ``methods``.

    ``None`` means every registered method that applies to ``model``; the others are *left
    out* with the reason. A method named explicitly that does not apply is *refused* (reported
    as failed, the others still run).

    Raises:
        TypeError / ValueError: for a malformed list or an unknown name.
    """
    if methods is None:
        reasons = {name: unsupported_reason(name, model) for name in registered_methods()}
        run = [name for name, why in reasons.items() if why is None]
        return run, {name: why for name, why in reasons.items() if why is not None}, {}
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError("methods must be a non-empty list of method names")
    bad = [m for m in methods if not isinstance(m, str)]
    if bad:
        raise TypeError(f"methods must be names (strings), got {bad[0]!r}")
    unknown = [m for m in methods if m.lower() not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(registered_methods())}"
        )
    names = list(dict.fromkeys(get_method(m).name for m in methods))
    refused = {}
    for name in names:
        why = unsupported_reason(name, model)
        if why is not None:
            refused[name] = f"it does not apply to this model: {why}"
    return [n for n in names if n not in refused], {}, refused


def method_options(
    methods: Sequence[str],
    given: Mapping[str, Mapping[str, Any]] | None,
    quick: bool,
    ignored: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Constructor options per method: quick mode's (those the method takes), then ``given``
    (options ``given`` for a method in ``ignored``, one that does not run, are dropped).

    Raises:
        TypeError / ValueError: for ``given`` that is malformed or names another method.
    """
    options: dict[str, dict[str, Any]] = {}
    for m in methods:
        spec = describe(m)
        accepted = set(spec.options)
        if spec.forwards_to:  # SmoothGrad: the wrapped method's options too
            accepted |= set(describe(spec.options[spec.forwards_to].default).options)
        quick_opts = QUICK_METHOD_OPTIONS.get(m, {}) if quick else {}
        options[m] = {k: v for k, v in quick_opts.items() if k in accepted}
    if given is None:
        return options
    if not isinstance(given, Mapping):
        raise TypeError("method_options must be a mapping method name → options")
    for name, extra in given.items():
        canonical = (
            get_method(name).name if isinstance(name, str) and name.lower() in METHODS else name
        )
        if canonical in ignored:
            continue
        if canonical not in options:
            raise ValueError(
                f"method_options names {name!r}, which is not among the methods {list(methods)}"
            )
        if not isinstance(extra, Mapping):
            raise TypeError(f"method_options[{name!r}] must be a mapping option → value")
        options[canonical].update(extra)
    return options


def check_images(images: Any) -> list[tuple[str, Tensor]]:
    if isinstance(images, (str, bytes, Tensor)) or not isinstance(images, Sequence) or not images:
        raise TypeError("images must be a non-empty list of (name, tensor) pairs")
    out = []
    for i, item in enumerate(images):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"images[{i}] must be a (name, tensor) pair")
        name, x = item
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            raise ValueError(
                f"image {name!r} must be a float tensor (C, H, W) or (C, D, H, W), got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}"
            )
        out.append((name, x))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("image names must be unique")
    return out


def check_names(values: Any, known: Sequence[str], what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{what} must be a non-empty list of names")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} must be names (strings), got {bad[0]!r}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    return list(dict.fromkeys(values))


def boxes_by_class(entries: Any, name: str) -> dict[int, list[list[float]]]:
    """``[[x0, y0, x1, y1, class], …]`` (or 3-D ``[x0, y0, z0, x1, y1, z1, class]``) by class."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(f"boxes[{name!r}] must be a list of [x0, y0, x1, y1, class]")
    out: dict[int, list[list[float]]] = {}
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) not in (5, 7):
            raise ValueError(
                f"boxes[{name!r}] entries must be [x0, y0, x1, y1, class] "
                f"(3-D: [x0, y0, z0, x1, y1, z1, class]), got {entry!r}"
            )
        *box, cls = entry
        if isinstance(cls, bool) or not isinstance(cls, int) or cls < 0:
            raise ValueError(f"boxes[{name!r}]: the class must be an int index >= 0, got {cls!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
            raise ValueError(f"boxes[{name!r}]: box coordinates must be numbers, got {entry!r}")
        out.setdefault(cls, []).append([float(v) for v in box])
    return out


def to_input_boxes(
    entries: Sequence[Sequence[Any]], crop: CropBox, name: str = "image"
) -> list[list[Any]]:
    """Boxes in original-photo pixels → model-input pixels through the resize and centre crop.

    With ``crop = model.preprocess.crop_box(width, height)`` (:class:`CropBox`),
    ``x' = clip(x · resized_width / width − left, 0, size)`` and the same down
    (:meth:`CropBox.to_input`). The class (the last element) is kept.

    Args:
        entries: ``[[x0, y0, x1, y1, class], …]`` in the photo's pixels (x right, y down).
        crop: the preprocessing's crop of that photo.
        name: the photo's name, for error messages.

    Returns:
        ``[[x0', y0', x1', y1', class], …]`` in the ``size × size`` model input.

    Raises:
        ValueError: for a malformed entry, or a box that lies wholly outside the crop (it would
            leave the pointing game nothing to point at).
    """
    out: list[list[Any]] = []
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 5
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in entry[:4])
        ):
            raise ValueError(
                f"boxes[{name!r}] entries must be [x0, y0, x1, y1, class], got {entry!r}"
            )
        x0, y0, x1, y1 = (float(v) for v in entry[:4])
        if x1 < x0 or y1 < y0:
            raise ValueError(f"boxes[{name!r}]: box {entry!r} has x1 < x0 or y1 < y0")
        box = list(crop.to_input((x0, y0, x1, y1)))
        if box[2] <= box[0] or box[3] <= box[1]:
            left, top, right, bottom = crop.region()
            raise ValueError(
                f"boxes[{name!r}]: box {entry!r} lies outside the model's centre crop "
                f"(original pixels x {left:.0f}…{right:.0f}, y {top:.0f}…{bottom:.0f})"
            )
        out.append([*box, entry[4]])
    return out
