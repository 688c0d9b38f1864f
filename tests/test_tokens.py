"""Token grids and transformer attribution: conversion, layer choice, CAMs on a ViT, rollout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em
from evidencemap.capture import AttentionRecorder
from evidencemap.methods import LayerMethod
from evidencemap.methods.attention import gradient_rollout, rollout
from evidencemap.tokens import Tokens, infer_grid, resolve_layout, to_grid, tokens_to_grid
from vit_helpers import digits, train_vit

# From the registry: every built-in layer method but CAM (which needs conv → GAP → linear).
CAMS = [
    n
    for n in em.methods()
    if issubclass(em.describe(n).cls, LayerMethod)
    and em.describe(n).cls.__module__.startswith("evidencemap.")
    and em.describe(n).cls.token_layers
    and n != "cam"
]


@pytest.fixture(scope="module")
def vits() -> dict[str, nn.Module]:
    """Both attention variants, trained on 4000 real digits (seconds)."""
    found = {}
    for attention in ("sdpa", "mha"):
        model, acc = train_vit(attention)
        assert acc > 0.5, f"{attention} ViT reached only {acc:.2f} held-out accuracy"
        found[attention] = model
    return found


@pytest.fixture(scope="module")
def held_out() -> tuple[Tensor, Tensor]:
    x, y = digits()
    return x[4000:4016], y[4000:4016]


# -- conversion ---------------------------------------------------------------------------------
def test_tokens_to_grid_by_hand() -> None:
    t = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)  # CLS + a 2×3 grid
    grid = tokens_to_grid(t, 1, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    for n in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    assert grid[n, c, i, j] == t[n, 1 + i * 3 + j, c]


@pytest.mark.parametrize(
    ("tokens", "spatial", "expected"),
    [
        (197, (224, 224), (1, (14, 14))),  # ViT-B/16 with CLS
        (198, (224, 224), (2, (14, 14))),  # DeiT: CLS + distillation
        (201, (224, 224), (5, (14, 14))),  # CLS + 4 registers
        (49, (28, 28), (0, (7, 7))),  # no prefix (global-average-pool ViT)
        (33, (32, 64), (1, (4, 8))),  # non-square inputs
        (1 + 2 * 4 * 4, (16, 32, 32), (1, (2, 4, 4))),  # a volume transformer
    ],
)
def test_infer_grid(tokens: int, spatial: tuple[int, ...], expected: tuple) -> None:
    assert infer_grid(tokens, spatial) == expected


def test_resolve_layout_kinds_and_errors() -> None:
    x = (2, 3, 224, 224)
    assert resolve_layout((2, 96, 7, 7), x).kind == "channels_first"
    swin = resolve_layout((2, 7, 7, 768), x)
    assert (swin.kind, swin.grid) == ("channels_last", (7, 7))
    vit = resolve_layout((2, 197, 768), x)
    assert (vit.kind, vit.prefix, vit.grid) == ("tokens", 1, (14, 14))
    assert resolve_layout((2, 1000), x) is None
    named = resolve_layout((2, 198, 768), x, Tokens("l", prefix=2))
    assert (named.prefix, named.grid) == (2, (14, 14))
    with pytest.raises(ValueError, match="not prefix 1"):
        resolve_layout((2, 197, 768), x, Tokens("l", prefix=1, grid=(7, 7)))
    with pytest.raises(ValueError, match="layout must be one of"):
        Tokens("l", layout="rows")
    with pytest.raises(TypeError, match="grid must be a tuple"):
        Tokens("l", grid=(7, 0))
    with pytest.raises(TypeError, match="prefix must be"):
        Tokens("l", prefix=-1)


class ChannelsLast(nn.Module):
    """conv → (N, H, W, C) → LayerNorm → pooled → linear (a Swin-style stage output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_channels_last_gradcam_equals_the_permuted_layer() -> None:
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x = torch.randn(2, 3, 32, 32)
    exp = em.GradCAM(model, layer="norm")(x, target=[1, 3])
    acts = model.norm(model.conv(x).permute(0, 2, 3, 1))
    score = model.head(acts.mean((1, 2)))[[0, 1], [1, 3]].sum()
    (grad,) = torch.autograd.grad(score, acts)
    a, g = acts.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    assert exp.extras["tokens"]["layout"] == "channels_last"
    torch.testing.assert_close(exp.raw, cam.detach(), atol=1e-5, rtol=1e-4)


# -- CAMs on the trained ViT ----------------------------------------------------------------------
def _grad_cam_recipe(model: nn.Module, layer: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """pytorch-grad-cam's recipe by hand: hooks, a reshape transform dropping CLS to 7×7,
    α = mean gradient, ReLU(Σ α A), bilinear upsampling, min-max."""
    box: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
        box["a"] = out
        out.register_hook(lambda g: box.__setitem__("g", g))

    def reshape_transform(t: Tensor) -> Tensor:
        return t[:, 1:, :].reshape(t.shape[0], 7, 7, t.shape[2]).permute(0, 3, 1, 2)

    handle = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    out.gather(1, target[:, None]).sum().backward()
    a, g = reshape_transform(box["a"].detach()), reshape_transform(box["g"])
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    cam = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)
    lo = cam.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = cam.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (cam - lo) / (hi - lo)


@pytest.mark.parametrize("attention", ["sdpa", "mha"])
def test_vit_gradcam_needs_no_user_code_and_equals_the_reshape_recipe(
    vits: dict, held_out: tuple, attention: str
) -> None:
    model = vits[attention]
    x, y = held_out
    exp = em.explain(model, x, "gradcam", target=y.tolist())
    # The last block's output tokens get no gradient (only CLS feeds the head): the pipeline
    # picks the attention's input instead, and says so.
    assert exp.layer == "blocks.1.norm1"
    assert exp.extras["tokens"] == {"layout": "tokens", "prefix": 1, "grid": [7, 7]}
    ref = _grad_cam_recipe(model, model.blocks[1].norm1, x, y)
    for p in model.parameters():
        p.grad = None
    torch.testing.assert_close(exp.maps, ref, atol=1e-4, rtol=1e-4)
    named = em.GradCAM(model, layer=Tokens("blocks.1.norm1", prefix=1, grid=(7, 7)))(x, y)
    torch.testing.assert_close(named.maps, exp.maps)


@pytest.mark.parametrize("method", [*CAMS, "guided_gradcam"])
def test_every_cam_runs_on_token_layers(vits: dict, held_out: tuple, method: str) -> None:
    model = vits["sdpa"]
    x, y = held_out
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = em.explain(model, x[:4], method, target=y[:4].tolist())
    assert exp.maps.shape[-2:] == (28, 28)
    assert torch.isfinite(exp.maps).all()
    assert exp.maps.amax() > 0
    assert exp.layer == "blocks.1.norm1"
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


REFUSE_TOKENS = [
    n
    for n in em.methods()
    if issubclass(em.describe(n).cls, LayerMethod) and not em.describe(n).cls.token_layers
]


@pytest.mark.parametrize("method", REFUSE_TOKENS)
def test_methods_without_token_support_refuse_token_layers(
    vits: dict, held_out: tuple, method: str
) -> None:
    model = vits["sdpa"]
    x, y = held_out
    with pytest.raises(
        ValueError, match=re.escape(method) + r" cannot explain layer .*tokens layout"
    ):
        em.explain(model, x[:2], method, target=y[:2].tolist(), layer="blocks.1.norm1")
    assert all(not m._forward_hooks for m in model.modules())


def test_smoothgrad_over_a_token_cam(vits: dict, held_out: tuple) -> None:
    model = vits["mha"]
    x, y = held_out
    exp = em.SmoothGrad(model, method=em.GradCAM(model), samples=4, seed=0)(x[:2], y[:2].tolist())
    assert exp.maps.shape == (2, 1, 28, 28)
    assert torch.isfinite(exp.maps).all()


def _energy_ratio(maps: Tensor, x: Tensor) -> float:
    """Mean map per pixel inside each digit's bounding box over the mean outside."""
    inside, outside = [], []
    for m, img in zip(maps[:, 0], x[:, 0], strict=True):
        rows, cols = torch.nonzero(img > 0.2, as_tuple=True)
        box = torch.zeros_like(img, dtype=torch.bool)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        inside.append(m[box].mean())
        outside.append(m[~box].mean())
    return float(torch.stack(inside).mean() / torch.stack(outside).mean())


@pytest.mark.parametrize("method", ["gradcam", "attention_rollout", "attention_gradient"])
def test_trained_vit_maps_concentrate_on_the_digit(
    vits: dict, held_out: tuple, method: str
) -> None:
    x, y = held_out
    exp = em.explain(vits["sdpa"], x, method, target=y.tolist())
    assert _energy_ratio(exp.maps, x) > 1.3


# -- attention capture --------------------------------------------------------------------------
def test_recorder_sdpa_matches_the_fused_kernel_and_mha_its_own_weights() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.rand(4, 5, 5) > 0.3
    mask[..., 0] = True
    rec = AttentionRecorder(2)
    with rec:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert len(rec.maps) == 2
    assert rec.maps[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(rec.maps[0].sum(-1), torch.ones(2, 4, 5))
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 6, 8, requires_grad=True)
    rec = AttentionRecorder(3)
    with rec:
        out, none = mha(x, x, x, need_weights=False)
    ref, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert none is None
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rec.maps[0], weights)


class FixedAttention(nn.Module):
    """Two blocks ``x ← softmax(S_b) x`` with fixed score matrices: known attention."""

    def __init__(self, scores: Tensor) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores)  # (blocks, heads, T, T)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = x.flatten(2).transpose(1, 2)  # (N, 4 patches, C)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)  # a CLS token: T = 5
        for s in self.scores:
            a = torch.softmax(s.expand(x.shape[0], -1, -1, -1), dim=-1)  # (N, heads, T, T)
            t = (a @ t.unsqueeze(1)).mean(1)
        return self.head(t[:, 0])


def test_rollout_on_a_two_block_toy_by_hand() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 5, 5)
    model = FixedAttention(scores).eval()
    x = torch.randn(2, 4, 2, 2)  # a 2×2 grid of 4-channel "patches"
    exp = em.explain(model, x, "attention_rollout")
    a = torch.softmax(scores, -1).mean(1)  # heads averaged
    eye = torch.eye(5)
    hat = [
        (0.5 * a[b] + 0.5 * eye) / (0.5 * a[b] + 0.5 * eye).sum(-1, keepdim=True) for b in (0, 1)
    ]
    expected = hat[1] @ hat[0]
    torch.testing.assert_close(exp.extras["relevance"][0], expected)
    torch.testing.assert_close(exp.extras["relevance"].sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(exp.raw[0, 0].flatten(), expected[0, 1:])
    assert exp.extras["tokens"] == {"layout": "tokens", "prefix": 1, "grid": [2, 2]}


def test_gradient_rollout_on_the_toy_by_hand() -> None:
    torch.manual_seed(1)
    scores = torch.randn(2, 2, 5, 5)
    model = FixedAttention(scores).eval()
    x = torch.randn(1, 4, 2, 2)
    exp = em.explain(model, x, "attention_gradient", target=2)
    maps = []
    s = model.scores
    t = x.flatten(2).transpose(1, 2)
    t = torch.cat([t.mean(1, keepdim=True), t], 1)
    for b in range(2):
        a = torch.softmax(s[b].expand(1, -1, -1, -1), -1)
        maps.append(a)
        t = (a @ t.unsqueeze(1)).mean(1)
    grads = torch.autograd.grad(model.head(t[:, 0])[0, 2], maps)
    r = torch.eye(5)
    for a, g in zip(maps, grads, strict=True):
        r = r + (g * a).clamp(min=0).mean(1)[0] @ r
    torch.testing.assert_close(exp.extras["relevance"][0], r.detach())
    torch.testing.assert_close(
        gradient_rollout([m.detach() for m in maps], list(grads))[0], r.detach()
    )
    assert model.scores.grad is None


def test_rollout_rows_sum_to_one_on_the_trained_vit(vits: dict, held_out: tuple) -> None:
    x, _ = held_out
    for variant in ("sdpa", "mha"):
        exp = em.AttentionRollout(vits[variant])(x[:4])
        assert exp.extras["blocks"] == 2
        torch.testing.assert_close(exp.extras["relevance"].sum(-1), torch.ones(4, 50))
    assert rollout([torch.full((1, 1, 3, 3), 1 / 3)], "max").sum(-1).allclose(torch.ones(1, 3))


def test_attention_methods_refuse_a_cnn_and_windowed_layouts() -> None:
    from tiny import ConvGapFc

    with pytest.raises(ValueError, match="no self-attention call"):
        em.explain(ConvGapFc().eval(), torch.randn(1, 3, 8, 8), "attention_rollout")
    with pytest.raises(ValueError, match="head_fusion"):
        em.AttentionRollout(ConvGapFc(), head_fusion="sum")
    with pytest.raises(ValueError, match="form no grid"):
        em.AttentionRollout(FixedAttention(torch.randn(1, 1, 5, 5)), prefix_tokens=2)(
            torch.randn(1, 4, 2, 2)
        )


def test_to_grid_converts_gradients_exactly() -> None:
    """Σ ∂y/∂grid ⊙ δgrid = Σ ∂y/∂t ⊙ δt for the linear index map (CLS dropped)."""
    t = torch.randn(2, 10, 4, requires_grad=True)  # CLS + 3×3
    layout = resolve_layout(tuple(t.shape), (2, 3, 12, 12))
    w = torch.randn(2, 4, 3, 3)
    (grad,) = torch.autograd.grad((to_grid(t, layout) * w).sum(), t)
    torch.testing.assert_close(to_grid(grad, layout), w)
    assert grad[:, 0].abs().sum() == 0
