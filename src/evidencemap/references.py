"""What removed or masked-out input becomes: one vocabulary for every method and metric.

FGVis' ``reference``, Integrated Gradients' ``baseline`` and the deletion / insertion
``substrate`` all take the same values:

* ``"zero"`` — 0 in the model's normalised input space (the data mean for standardised inputs);
* ``"blur"`` — the input blurred by a Gaussian (:func:`evidencemap.filters.gaussian_filter`);
* ``"mean"`` — each sample's per-channel mean;
* a number — that constant;
* a tensor broadcastable to the inputs: ``(C, *S)``, ``(1 | N, C, *S)``, ``(C, 1, …)`` ….
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from evidencemap.filters import gaussian_filter

__all__ = ["REFERENCES", "check_reference", "reference_image"]

REFERENCES = ("zero", "blur", "mean")
"""The named references."""


def check_reference(value: Any, name: str = "reference") -> str | float | Tensor:
    """Validate a reference: a name from :data:`REFERENCES`, a number or a finite tensor.

    Raises:
        TypeError: for another type. ValueError: for an unknown name or a non-finite tensor.
    """
    if isinstance(value, str):
        if value not in REFERENCES:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, REFERENCES))}, a number or a "
                f"tensor, got {value!r}"
            )
        return value
    if isinstance(value, Tensor):
        if not value.is_floating_point() and value.dtype != torch.bool:
            value = value.float()
        if not bool(torch.isfinite(value.float()).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be one of {', '.join(map(repr, REFERENCES))}, a number or a tensor, "
            f"got {type(value).__name__}"
        )
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def reference_image(
    x: Tensor,
    reference: str | float | Tensor,
    *,
    blur_sigma: float = 10.0,
    blur_radius: int | None = None,
    blur_padding: str = "mirror",
    name: str = "reference",
) -> Tensor:
    """The reference ``r`` ``(N, C, *S)`` for inputs ``x`` (same shape, dtype and device).

    Args:
        x: ``(N, C, *S)`` inputs.
        reference: see the module docstring.
        blur_sigma / blur_radius / blur_padding: the ``"blur"`` reference's Gaussian
            (:func:`~evidencemap.filters.gaussian_filter`).
        name: the argument's name, for error messages.

    Raises:
        ValueError: for a tensor that does not broadcast to ``x``.
    """
    reference = check_reference(reference, name)
    if isinstance(reference, str):
        if reference == "zero":
            return torch.zeros_like(x)
        if reference == "blur":
            return gaussian_filter(x, blur_sigma, radius=blur_radius, padding=blur_padding)
        return x.flatten(2).mean(2).view(*x.shape[:2], *([1] * (x.ndim - 2))).expand_as(x)
    if isinstance(reference, Tensor):
        ref = reference.to(device=x.device, dtype=x.dtype)
        if ref.ndim == x.ndim - 1:
            ref = ref.unsqueeze(0)
        try:
            return torch.broadcast_to(ref, x.shape).detach()
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(reference.shape)} does not broadcast to the inputs "
                f"{tuple(x.shape)}; give (C, *S), (1 or N, C, *S) or a broadcastable shape"
            ) from None
    return torch.full_like(x, float(reference))
