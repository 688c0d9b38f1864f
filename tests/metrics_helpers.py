"""Models and data with a known answer for the metric tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BoxModel(nn.Module):
    """Two classes; class 0's logit is ``scale · (mean of the input inside one box − offset)``.

    The mean runs over every channel of the box's positions, so the model looks only at the
    box: a map marking the box is the right explanation of class 0. Class 1's logit is 0, so
    ``p_0 = sigmoid(scale · (box mean − offset))``. Works for 2-D and 3-D inputs (the box is a
    tuple of slices, one per spatial axis).
    """

    def __init__(
        self,
        spatial: tuple[int, ...],
        box: tuple[slice, ...],
        scale: float = 4.0,
        offset: float = 0.5,
    ):
        super().__init__()
        mask = torch.zeros((1, 1, *spatial))
        mask[(slice(None), slice(None), *box)] = 1.0
        self.register_buffer("mask", mask)
        self.scale = scale
        self.offset = offset
        # one parameter so that check_model and the randomisation see a real model
        self.gain = nn.Parameter(torch.ones(()))

    def box_mean(self, x: Tensor) -> Tensor:
        """``(N,)`` mean of ``x`` over every channel of the box."""
        return (x * self.mask).flatten(1).sum(1) / (self.mask.sum() * x.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        logit = self.gain * self.scale * (self.box_mean(x) - self.offset)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def sigmoid(v: float) -> float:
    """Logistic function on a float (``p_0`` of :class:`BoxModel`)."""
    return 1 / (1 + math.exp(-v))


def box_map(spatial: tuple[int, ...], box: tuple[slice, ...], n: int = 1) -> Tensor:
    """``(n, 1, *S)`` maps equal to 1 inside ``box`` and 0 elsewhere."""
    m = torch.zeros((n, 1, *spatial))
    m[(slice(None), slice(None), *box)] = 1.0
    return m


def random_maps(shape: tuple[int, ...], seed: int) -> Tensor:
    """Uniform random maps (the explanation that knows nothing)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def plane(shape: tuple[int, ...]) -> Tensor:
    """A linear image / volume ``(N, C, *S)``: ``0.1 + 0.02·i_last − 0.01·i_first (+ 0.005·i_mid)``."""
    spatial = shape[2:]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial], indexing="ij")
    slopes = [-0.01, 0.005, 0.02][-len(spatial) :]
    value = 0.1 + sum(a * g for a, g in zip(slopes, grids, strict=True))
    return value.expand(shape).clone()
