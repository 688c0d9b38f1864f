"""Tiny deterministic models for hand-checkable tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvGapFc(nn.Module):
    """conv → ReLU → (conv → ReLU) → global average pool → linear; 2-D or 3-D."""

    def __init__(
        self,
        dims: int = 2,
        channels: int = 3,
        width: int = 6,
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


class MLP(nn.Module):
    """No spatial layer at all."""

    def __init__(self, size: int = 3 * 8 * 8, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(size, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TupleOut(nn.Module):
    """Returns (logits, features) or {"logits": …, "features": …}."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.net = ConvGapFc()
        self.as_dict = as_dict

    def forward(self, x: Tensor) -> object:
        logits = self.net(x)
        return {"logits": logits, "aux": logits * 0} if self.as_dict else (logits, logits * 0)


class TinySegmenter(nn.Module):
    """Per-pixel class logits (N, K, H, W)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


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


class OffsetNet(nn.Module):
    """h = ReLU(b − W x) (1×1 conv, W = 0.5/C > 0, b = 2) → global average pool → linear.

    For positive inputs every unit is active and *rises* when the image is dimmed (its bias
    outweighs the shrinking image term), so FGVis' defence (0 ≤ h(e) ≤ h(x)) blocks the whole
    gradient at any dimming: the additive-offset starvation in its purest form. Class 0's
    logit is ``3 − mean(h)``, the others 0: class 0 wins on the image and loses probability
    when the image is dimmed towards 0.
    """

    def __init__(self, channels: int = 3, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 1)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            self.conv.weight.fill_(-0.5 / channels)
            self.conv.bias.fill_(2.0)
            self.fc.weight.zero_()
            self.fc.weight[0].fill_(-1.0 / width)
            self.fc.bias.zero_()
            self.fc.bias[0] = 3.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
