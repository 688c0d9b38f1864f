"""The one-call entry point: :func:`explain`, and :func:`methods` / :func:`get_method`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from evidencemap.explanation import Explanation
from evidencemap.layers import LayerSpec
from evidencemap.methods import METHODS, Method
from evidencemap.targets import Target

__all__ = ["explain", "get_method", "methods"]


def methods() -> list[str]:
    """The names of every method (aliases not included), in registration order."""
    return list(dict.fromkeys(cls.name for cls in METHODS.values()))


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (case-insensitive).

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: for an unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    cls = METHODS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(methods())}")
    return cls


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str = "gradcam",
    target: Target = None,
    layer: LayerSpec = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s decision on ``inputs`` with ``method``.

    Args:
        model: any ``nn.Module`` taking ``(N, C, H, W)`` images or ``(N, C, D, H, W)`` volumes.
        inputs: the normalised model inputs.
        method: a name from :func:`methods` (e.g. ``"gradcam"``, ``"scorecam"``, ``"fgvis"``).
        target: ``None`` (top-1 per sample), an int, ``N`` class indices, or a callable from the
            model output to ``N`` scores (see :mod:`evidencemap.targets`).
        layer: for layer methods, a module, dotted name or list of them; ``None`` picks the last
            spatial layer automatically.
        **options: the method's options (see its class).

    Returns:
        An :class:`Explanation` whose ``maps`` are ``(N, 1, *input_spatial)`` in [0, 1].
    """
    cls = get_method(method)
    if cls.uses_layer:
        instance = cls(model, layer, **options)  # type: ignore[call-arg]
    else:
        if layer is not None:
            raise ValueError(f"method {cls.name!r} works in input space and takes no layer")
        instance = cls(model, **options)
    return instance(inputs, target)
