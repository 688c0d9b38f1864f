"""FGVis' fused ReLU / ReLU6 gate against a literal implementation of the defence (Eq. 4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em
from evidencemap.capture import NonlinearityInterceptor
from evidencemap.methods.fgvis import DefenceRule, record_bounds


class ReluMix(nn.Module):
    """1×1 conv → ReLU6 module → conv → in-place ReLU → conv → F.relu6 → conv → Tensor.relu
    → linear; 2-D or 3-D. ``acts`` lists its activation functions, for the reference."""

    def __init__(self, dims: int = 2, width: int = 4) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.convs = nn.ModuleList([conv(1 if i == 0 else width, width, 1) for i in range(4)])
        self.relu6 = nn.ReLU6()
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.LazyLinear(3)
        self.acts: list[Callable[[Tensor], Tensor]] = [
            self.relu6,
            self.relu,
            F.relu6,
            torch.relu,
        ]
        # Integer weights and biases: activations are exact integers, so e = x, e = 2x and
        # e = x − 1 put many units exactly on 0, on 6 and on their bound h(x).
        with torch.no_grad():
            for i, c in enumerate(self.convs):
                w = torch.arange(c.weight.numel(), dtype=torch.float32) % 5 - 2
                c.weight.copy_(w.view_as(c.weight) * (1 if i == 0 else 0.5))
                c.bias.copy_(torch.arange(c.bias.numel(), dtype=torch.float32) - 1)

    def forward(self, x: Tensor) -> Tensor:
        a = x
        a = self.relu6(self.convs[0](a))
        a = self.relu(self.convs[1](a))
        a = F.relu6(self.convs[2](a))
        a = self.convs[3](a).relu()
        return self.fc(a.flatten(1))


def eq4_gradient(net: ReluMix, x: Tensor, e: Tensor) -> Tensor:
    """∂ logit_0 / ∂e with every activation's gradient multiplied by
    ``1[min(0, h(x)) ≤ h(e) ≤ max(0, h(x))]`` — the paper's rule written out by hand."""
    with torch.no_grad():
        clean, a = [], x
        for conv, act in zip(net.convs, net.acts, strict=True):
            a = act(conv(a))
            clean.append(a.clone())
    e = e.clone().requires_grad_(True)
    a = e
    for conv, act, hx in zip(net.convs, net.acts, clean, strict=True):
        h = act(conv(a))
        inside = (h >= hx.clamp(max=0)) & (h <= hx.clamp(min=0))
        h.register_hook(lambda g, inside=inside: g * inside)
        a = h
    (grad,) = torch.autograd.grad(net.fc(a.flatten(1))[:, 0].sum(), e)
    return grad


def library_gradient(net: nn.Module, x: Tensor, e: Tensor, rule: type[DefenceRule]) -> Tensor:
    with torch.no_grad():
        _, bounds = record_bounds(net, x)
    e = e.clone().requires_grad_(True)
    with NonlinearityInterceptor(rule(bounds)):
        out = net(e)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), e)
    return grad


class UnfusedRule(DefenceRule):
    """Overrides ``__call__``, so every call takes the general path (GradientGate + rule)."""

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        return super().__call__(index, name, h)


@pytest.mark.parametrize("dims", [2, 3])
def test_fused_gate_equals_eq4_on_relu_and_relu6(dims: int) -> None:
    torch.manual_seed(0)
    net = ReluMix(dims)
    shape = (2, 1, 5, 4) if dims == 2 else (2, 1, 3, 3, 2)
    x = torch.randint(-4, 8, shape).float()
    net(x)  # materialise the lazy layer
    for e in (x, 2 * x, x - 1, x * 0.37, torch.randint(-4, 8, shape).float()):
        expected = eq4_gradient(net, x, e)
        fused = library_gradient(net, x, e, DefenceRule)
        general = library_gradient(net, x, e, UnfusedRule)
        assert torch.equal(fused, expected)
        assert torch.equal(general, expected)
    # The case list does exercise the gate: some gradient is blocked, some passes.
    blocked = library_gradient(net, x, 2 * x, DefenceRule)
    assert blocked.abs().sum() < eq4_gradient(net, x, x).abs().sum()


def test_fused_path_is_one_node_per_call() -> None:
    net = ReluMix()
    x = torch.randint(-4, 8, (1, 1, 4, 4)).float()
    net(x)
    with torch.no_grad():
        _, bounds = record_bounds(net, x)
    seen: list[str] = []

    class Spy(DefenceRule):
        def replace(self, index: int, name: str, z: Tensor) -> Tensor | None:
            out = super().replace(index, name, z)
            seen.append(type(out.grad_fn).__name__ if out is not None else "none")
            return out

    e = x.clone().requires_grad_(True)
    with NonlinearityInterceptor(Spy(bounds)):
        net(e)
    assert seen == ["_GatedClampBackward"] * 4
    # Without gradients (a scoring pass) the calls run unchanged.
    seen.clear()
    with torch.no_grad(), NonlinearityInterceptor(Spy(bounds)):
        net(x)
    assert seen == ["none"] * 4


def test_fused_gate_raises_on_other_calls_than_the_clean_pass() -> None:
    net = ReluMix()
    x = torch.randint(-4, 8, (1, 1, 4, 4)).float()
    net(x)
    with torch.no_grad():
        _, bounds = record_bounds(net, x)
    e = torch.zeros(1, 1, 5, 4, requires_grad=True)
    with (
        pytest.raises(RuntimeError, match="same calls"),
        NonlinearityInterceptor(DefenceRule(bounds)),
    ):
        net(e)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fgvis_masks_on_lite0_equal_the_general_path(
    lite0: nn.Module, photos: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run() -> Tensor:
        exp = em.explain(
            lite0, photos, "fgvis", lam=1.0, max_iterations=6, patience=6, schedule="fine"
        )
        return exp.extras["mask"]

    fused = run()
    monkeypatch.setattr(DefenceRule, "replace", lambda self, index, name, z: None)
    general = run()
    torch.testing.assert_close(fused, general, rtol=1e-6, atol=1e-7)
