"""Argument validation shared by every entry point: clear errors that name the argument."""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["ModelLike", "check_inputs", "check_model", "check_positive_int"]


class ModelLike(Protocol):
    """What the library takes besides an ``nn.Module``: an object holding one in ``module``
    (:class:`~evidencemap.models.LoadedModel`; the core never imports the model zoo)."""

    @property
    def module(self) -> nn.Module:
        """The model's module."""
        ...


def check_model(model: nn.Module | ModelLike | Any) -> nn.Module:
    """The module of ``model``: ``model`` itself if it is an ``nn.Module``, ``model.module`` if it
    is a :class:`~evidencemap.models.LoadedModel` (what ``evidencemap.models.load`` returns).

    Raises:
        TypeError: otherwise.
    """
    if isinstance(model, nn.Module):
        return model
    # A LoadedModel exists only once its module is imported: no import needed (nor wanted:
    # the core does not import the model zoo and its image libraries).
    loading = sys.modules.get("evidencemap.models.loading")
    if loading is not None and isinstance(model, loading.LoadedModel):
        return check_model(model.module)
    raise TypeError(
        f"model must be a torch.nn.Module or an evidencemap.models.LoadedModel, "
        f"got {type(model).__name__}"
    )


def check_inputs(inputs: Any, name: str = "inputs") -> Tensor:
    """Validate a batch of images ``(N, C, H, W)`` or volumes ``(N, C, D, H, W)``.

    Raises:
        TypeError: when ``inputs`` is not a floating-point tensor.
        ValueError: for another rank, an empty batch or axis, or NaN/inf values.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (normalised model input), got {inputs.dtype}"
        )
    if inputs.ndim not in (4, 5):
        raise ValueError(
            f"{name} must be (N, C, H, W) images or (N, C, D, H, W) volumes, "
            f"got a tensor of shape {tuple(inputs.shape)}"
        )
    if inputs.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(inputs.shape)}")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return inputs


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int ≥ 1.

    Raises:
        TypeError / ValueError: otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value
