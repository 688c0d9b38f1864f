"""Tiny deterministic models, the model-state snapshot and real photos for the CF-CAM and
gradient-method tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """conv → ReLU → conv → ReLU → global average pool → linear; 2-D or 3-D."""

    def __init__(
        self,
        dims: int = 2,
        channels: int = 3,
        width: int = 8,
        classes: int = 4,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        self.features = nn.Sequential(
            conv(channels, width, 3, padding=1),
            nn.ReLU(inplace=inplace),
            conv(width, width, 3, padding=1),
            nn.ReLU(inplace=inplace),
        )
        self.pool = pool(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class ControlledLayer(nn.Module):
    """The explained layer's output IS the input (``layer`` = identity), followed by a linear
    read-out of the flattened activations: ``y_c = Σ_{k,p} U[c, k, p] A_{k,p}``, so
    ``∂y_c/∂A = U[c]`` exactly."""

    def __init__(self, readout: Tensor) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.readout = nn.Parameter(readout.clone())  # (classes, K, *s)

    def forward(self, x: Tensor) -> Tensor:
        a = self.layer(x)
        return a.flatten(1) @ self.readout.flatten(1).T


def seeded(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Re-initialise ``module`` deterministically and put it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything an explanation must leave unchanged."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "hooks": [
            (
                n,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for n, m in model.named_modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    for key, value in before["params"].items():  # type: ignore[union-attr]
        assert torch.equal(value, after["params"][key]), key  # type: ignore[index]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for name, grad in before["grad"].items():  # type: ignore[union-attr]
        other = after["grad"][name]  # type: ignore[index]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    assert all(h[1:] == (0, 0, 0, 0) for h in after["hooks"])  # type: ignore[union-attr]
    assert not torch.overrides._get_current_function_mode_stack()  # no torch-function mode left


class ReLU6AsReLU(nn.ReLU):
    """ReLU6 that Captum's guided backprop recognises (it only hooks ``nn.ReLU`` modules)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


def captum_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.ReLU6`` modules are :class:`ReLU6AsReLU` (same function)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, ReLU6AsReLU())
    return twin.eval()


def load_photos(model: nn.Module, names: tuple[str, ...] = ("chelsea", "coffee")) -> Tensor:
    """Real photos from scikit-image, preprocessed for the built-in model, ``(N, 3, 224, 224)``."""
    from skimage import data

    return torch.stack([model.preprocess(getattr(data, n)()) for n in names])  # type: ignore[operator]
