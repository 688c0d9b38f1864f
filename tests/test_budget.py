"""Chunks sized by what a chunk really holds: the backward pass's saved activations, not only
the perturbed inputs (SmoothGrad and Integrated Gradients on a 3-D network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import evidencemap as em
from evidencemap import runtime
from evidencemap.methods.gradients import copy_bytes
from tiny import seeded

S = (6, 5, 4)  # a small volume, 120 voxels
BUDGET_COPIES = 8  # the hand count of 8 copies: the inputs of all 8 fit 8 times over


class WideConv3d(nn.Module):
    """Conv3d 1→16 at full resolution, ReLU, global mean, linear: the saved ReLU output is 16
    times the input, so the activations, not the inputs, decide a chunk's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))


@pytest.fixture
def model() -> nn.Module:
    return seeded(WideConv3d())


def _batch_sizes(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_autograd_bytes_counts_the_saved_activations_by_hand(model):
    x = torch.rand(2, 1, *S)
    relu_out = 2 * 16 * 120 * 4  # the only saved tensor that is neither x nor a parameter
    # (mean saves nothing; the linear saves the mean (2×16) and its weight)
    mean_out = 2 * 16 * 4
    resident = list(model.parameters())
    assert runtime.autograd_bytes(model, x, resident) == relu_out + mean_out
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    assert runtime.autograd_bytes(model, x) == relu_out + mean_out + weights
    # linear in the batch, and nothing requires a gradient afterwards
    assert runtime.autograd_bytes(model, torch.cat([x, x]), resident) == 2 * (relu_out + mean_out)
    assert x.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_copy_bytes_measures_only_under_a_budget(model):
    x = torch.rand(1, 1, *S)
    method = em.SmoothGrad(model)
    inputs = 2 * 120 * 4
    assert copy_bytes(method, x, None) == inputs  # no budget: no extra forward pass
    saved = 16 * 120 * 4 + 16 * 4
    assert copy_bytes(method, x, 10**9) == inputs + saved
    with runtime.limits(memory_budget=10**9):
        assert copy_bytes(method, x, None) == inputs + saved
        assert copy_bytes(method, x, None, backward=False) == inputs


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("smoothgrad", {"samples": 8, "seed": 3}),
        ("smoothgrad", {"samples": 8, "seed": 3, "wrap": "gradcam", "layer": "conv"}),
        ("integrated_gradients", {"steps": 8}),
    ],
)
def test_the_activations_split_the_copies_into_chunks(model, name, options):
    x = torch.rand(1, 1, *S)
    whole = em.explain(model, x, name, **options)
    per_copy = 2 * 120 * 4 + 16 * 120 * 4 + 16 * 4  # inputs + saved activations, by hand
    sizes, handle = _batch_sizes(model)
    try:
        with runtime.limits(memory_budget=BUDGET_COPIES * per_copy):
            chunked = em.explain(model, x, name, **options)
    finally:
        handle.remove()
    # by the inputs alone (960 B a copy) all 8 copies would be one chunk; counted with what
    # their backward passes hold (and the first copy's measured peak, which is larger than the
    # hand count: gradients and temporaries) they come in several chunks of more than one copy
    assert 2 <= max(sizes) < 8, sizes
    assert torch.allclose(whole.maps, chunked.maps, atol=1e-6)
    assert torch.allclose(whole.scores, chunked.scores)
    # the method's own budget does the same
    sizes, handle = _batch_sizes(model)
    try:
        em.explain(model, x, name, memory_budget=BUDGET_COPIES * per_copy, **options)
    finally:
        handle.remove()
    assert 2 <= max(sizes) < 8, sizes


def test_a_copy_larger_than_the_budget_is_refused_before_the_chunks(model):
    x = torch.rand(1, 1, *S)
    sizes, handle = _batch_sizes(model)
    try:
        # room for the inputs of every copy, not for one copy's activations
        with (
            runtime.limits(memory_budget=8 * 2 * 120 * 4),
            pytest.raises(runtime.BudgetExceededError, match="noisy batches"),
        ):
            em.explain(model, x, "smoothgrad", samples=8)
    finally:
        handle.remove()
    assert max(sizes) == 1  # no chunk ran
