"""The one-call entry point :func:`explain`; :func:`methods` / :func:`get_method` / :func:`build`
come from :mod:`evidencemap.methods.registry`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from evidencemap.explanation import Explanation
from evidencemap.layers import LayerSpec
from evidencemap.methods.registry import build, describe, get_method, method_names
from evidencemap.targets import Target

if TYPE_CHECKING:
    from evidencemap.models.loading import LoadedModel

__all__ = ["build", "describe", "explain", "get_method", "methods"]


def methods() -> list[str]:
    """The names of every method (aliases not included), in registration order."""
    return method_names()


def explain(
    model: nn.Module | LoadedModel,
    inputs: Tensor,
    method: str = "gradcam",
    target: Target = None,
    layer: LayerSpec = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s decision on ``inputs`` with ``method``.

    Args:
        model: any ``nn.Module`` taking ``(N, C, H, W)`` images or ``(N, C, D, H, W)`` volumes,
            or the :class:`~evidencemap.models.LoadedModel` of ``evidencemap.models.load``.
        inputs: the normalised model inputs.
        method: a name from :func:`methods` (e.g. ``"gradcam"``, ``"scorecam"``, ``"fgvis"``).
        target: ``None`` (top-1 per sample), an int, ``N`` class indices, a callable from the
            model output to ``N`` scores, or ``N`` callables, one per sample, each from that
            sample's output row to a scalar (see :mod:`evidencemap.targets`).
        layer: for layer methods, a module, dotted name or list of them; ``None`` picks the last
            spatial layer automatically.
        **options: the method's options (``describe(method).options`` lists them).

    Returns:
        An :class:`Explanation` whose ``maps`` are ``(N, 1, *input_spatial)`` in [0, 1].

    Raises:
        OptionError: for an option the method does not take (a ``ValueError``).
    """
    return build(method, model, layer, **options)(inputs, target)
