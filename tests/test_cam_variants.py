"""Ablation-CAM and Grad-CAM element-wise: hand-computed maps, the peers' formulas re-derived,
the real model on a real photo.

pytorch-grad-cam imports torchvision and OpenCV, which do not import here: its algorithms are
re-derived below from its source (the same loops and arithmetic), and compared with ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em
from evidencemap.methods.ablationcam import objectness_scores
from tiny import ConvGapFc, seeded


def hand_model() -> ConvGapFc:
    """Layer ``features.3``: channel 0 = ReLU(x), channel 1 = ReLU(−x); fc rows (2, −1), (0.5, 3)."""
    model = ConvGapFc(channels=1, width=2, classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.features[0].weight[0, 0, 1, 1] = 1.0
        model.features[0].weight[1, 0, 1, 1] = -1.0
        model.features[2].weight[0, 0, 1, 1] = 1.0
        model.features[2].weight[1, 1, 1, 1] = 1.0
        model.fc.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 3.0]]))
    return model


HAND_X = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])


def test_ablationcam_by_hand():
    # A0 = [[1, 0], [0, 3]] (mean 1), A1 = [[0, 2], [0, 0]] (mean 0.5); y_0 = 2·1 − 0.5 = 1.5.
    # Zero A0: y = −0.5, w0 = (1.5 + 0.5) / 1.5 = 4/3. Zero A1: y = 2, w1 = (1.5 − 2) / 1.5 = −1/3.
    exp = em.explain(hand_model(), HAND_X, "ablationcam", target=0, layer="features.3")
    expected = torch.tensor([[[[4 / 3, 0.0], [0.0, 4.0]]]])  # ReLU(4/3·A0 − 1/3·A1)
    assert torch.allclose(exp.raw, expected, atol=1e-6)
    assert torch.allclose(exp.maps, expected / 4.0, atol=1e-6)


def test_gradcam_elementwise_by_hand():
    # y_0 = GAP(A)·(2, −1): g0 = 2/4 everywhere, g1 = −1/4. M = Σ_k ReLU(g_k A_k):
    # ReLU(0.5·A0) + ReLU(−0.25·A1) = [[0.5, 0], [0, 1.5]] (HiResCAM would give 0.5·A0 − 0.25·A1).
    exp = em.explain(hand_model(), HAND_X, "gradcam_elementwise", target=0, layer="features.3")
    assert torch.allclose(exp.raw, torch.tensor([[[[0.5, 0.0], [0.0, 1.5]]]]), atol=1e-6)
    hires = em.explain(hand_model(), HAND_X, "hirescam", target=0, layer="features.3", relu=False)
    assert float(hires.raw[0, 0, 0, 1]) == pytest.approx(-0.5)  # the cancellation it avoids


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def case(request):
    dims = request.param
    model = seeded(ConvGapFc(dims=dims), seed=dims)
    shape = (3, 3, 9, 10) if dims == 2 else (2, 3, 5, 6, 7)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1))


def pgc_elementwise(model: ConvGapFc, x: Tensor, classes: Tensor) -> Tensor:
    """pytorch-grad-cam's ``GradCAMElementWise.get_cam_image``: ``max(g·A, 0).sum(1)``."""
    acts = model.features(x).detach().requires_grad_(True)
    logits = model.fc(acts.mean(dim=tuple(range(2, acts.ndim))))
    (grads,) = torch.autograd.grad(logits[torch.arange(len(x)), classes].sum(), acts)
    return np.maximum((grads * acts).detach().numpy(), 0).sum(axis=1)


def test_gradcam_elementwise_matches_pytorch_grad_cam(case):
    model, x = case
    exp = em.explain(model, x, "gradcam_elementwise", target=1)
    want = pgc_elementwise(model, x, torch.ones(len(x), dtype=torch.long))
    assert torch.allclose(exp.raw[:, 0], torch.from_numpy(want), atol=1e-6)


def pgc_ablation_weights(model: ConvGapFc, x: Tensor, classes: Tensor) -> Tensor:
    """pytorch-grad-cam's ``AblationCAM.get_cam_weights`` (ratio 1): per image, the whole model
    on copies whose layer output is the cached activations with one channel ablated (0 when the
    activations' minimum is 0, else min − 1e7); ``w = (y − y_k) / y``."""
    acts = model.features(x).detach()
    original = model(x).detach()[torch.arange(len(x)), classes]
    weights = []
    for b, c in enumerate(classes.tolist()):
        scores = []
        for ch in range(acts.shape[1]):
            out = acts[b : b + 1].clone()
            out[0, ch] = 0 if acts.min() == 0 else acts.min() - 1e7
            pooled = out.mean(dim=tuple(range(2, out.ndim)))
            scores.append(float(model.fc(pooled)[0, c].detach()))
        weights.append((original[b] - torch.tensor(scores)) / original[b])
    return torch.stack(weights)


def test_ablationcam_matches_pytorch_grad_cam_and_chunks_agree(case):
    model, x = case
    classes = torch.tensor([2] * len(x))
    exp = em.explain(model, x, "ablationcam", target=2, relu=False, internal_batch_size=5)
    acts = model.features(x).detach()
    w = pgc_ablation_weights(model, x, classes)
    flat = acts.flatten(2)
    w = w.where((flat.amax(2) - flat.amin(2)) > 1e-12, torch.zeros_like(w))  # all-zero: drop 0
    want = (w.view(*w.shape, *([1] * (acts.ndim - 2))) * acts).sum(1, keepdim=True)
    assert torch.allclose(exp.raw, want, atol=1e-5)
    for options in ({"internal_batch_size": 1}, {"memory_budget": acts[0].numel() * 4 * 4}):
        other = em.explain(model, x, "ablationcam", target=2, relu=False, **options)
        assert torch.allclose(other.raw, exp.raw, atol=1e-6)


class SkipNet(nn.Module):
    """A skip connection around the explained layer ``conv2``: fc(GAP(conv2(h) + h))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        return self.fc((self.conv2(h) + h).mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 3])
def test_ablationcam_with_a_path_around_the_layer(batch):
    # batch 1: the inputs' own pass broadcasts over the copies (exact); batch 3: it cannot, and
    # the whole model runs on the copies of the inputs. Both equal the loop by hand.
    model = seeded(SkipNet(), seed=3)
    x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    exp = em.explain(model, x, "ablationcam", layer="conv2", target=0, relu=False)
    with torch.no_grad():
        h = torch.relu(model.conv1(x))
        a = model.conv2(h)
        y = model.fc((a + h).mean((2, 3)))[:, 0]
        for i in range(batch):
            w = []
            for k in range(4):
                ablated = a[i : i + 1].clone()
                ablated[0, k] = 0
                w.append((y[i] - model.fc((ablated + h[i : i + 1]).mean((2, 3)))[0, 0]) / y[i])
            want = (torch.stack(w).view(4, 1, 1) * a[i]).sum(0)
            assert torch.allclose(exp.raw[i, 0], want, atol=1e-5)


def pgc_channels_to_ablate(acts: np.ndarray, ratio: float) -> np.ndarray:
    """pytorch-grad-cam's ``AblationLayer.activations_to_be_ablated`` for one image ``(K, *s)``."""
    flat = acts.reshape(acts.shape[0], -1).T
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    projection = np.abs(centred @ vt[0, :])
    projection = projection - projection.min()
    mask = projection / projection.max() > 0.01
    scores = []
    for channel in acts.reshape(acts.shape[0], -1):
        normalized = np.abs(channel)
        normalized = normalized - normalized.min()
        normalized = normalized / np.max(normalized)
        scores.append((mask * normalized).sum() / normalized.sum())
    indices = list(np.argsort(np.float32(scores)))
    count = int(len(indices) * ratio)
    return np.int32(indices[::-1][:count] + indices[:count])


def test_ablation_ratio_picks_pytorch_grad_cams_channels():
    acts = torch.randn(2, 20, 5, 6, generator=torch.Generator().manual_seed(4)).double()
    scores = objectness_scores(acts)
    model = seeded(ConvGapFc(width=20))
    method = em.build("ablationcam", model, ratio=0.5)  # 10 channels: 5 highest, 5 lowest
    order, real = method.ablation_order(acts)
    for i in range(2):
        want = pgc_channels_to_ablate(acts[i].numpy(), 0.25)
        assert sorted(order[i][real[i]].tolist()) == sorted(want.tolist())
        assert np.isfinite(scores[i].numpy()).all()


def test_ablationcam_options_and_errors():
    model = seeded(ConvGapFc())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = em.explain(model, x, "ablationcam")
    top = em.explain(model, x, "ablationcam", top_k=2)
    assert top.maps.shape == full.maps.shape
    assert torch.isfinite(top.maps).all()
    with pytest.raises(ValueError, match="ratio"):
        em.build("ablationcam", model, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        em.build("ablationcam", model, ratio=1.5)


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_ablationcam_on_the_real_model_agrees_with_gradcam(lite0, photos):
    cat = photos[:1]
    grad = em.explain(lite0.module, cat, "gradcam")
    ablation = em.explain(lite0.module, cat, "ablationcam", ratio=0.1)  # 128 channels
    elementwise = em.explain(lite0.module, cat, "gradcam_elementwise")
    assert ablation.layer == grad.layer
    # the same class evidence: both maps concentrate where Grad-CAM's top fifth lies
    top = grad.maps >= torch.quantile(grad.maps.flatten(), 0.8)
    for exp in (ablation, elementwise):  # measured: 0.87 and 0.99; 1.7× and 2.1×
        assert pearson(exp.maps, grad.maps) > 0.75
        assert float(exp.maps[top].mean()) > 1.5 * float(exp.maps[~top].mean())


@pytest.mark.slow  # a timing: loose, but a loaded machine can still break it
def test_ablation_passes_run_only_the_network_after_the_layer(lite0, photos):
    # The default layer of Lite0 is its last: the ablated passes skip the backbone, so ablating
    # all 1280 channels costs far less than 1280 forwards (timed loosely: a loaded machine).
    import time

    cat = photos[:1]
    with torch.inference_mode():
        lite0.module(cat)
        start = time.perf_counter()
        for _ in range(3):
            lite0.module(cat)
        forward = (time.perf_counter() - start) / 3
    start = time.perf_counter()
    em.explain(lite0.module, cat, "ablationcam")  # chunks of 256: 5 passes, a probe, a capture
    assert time.perf_counter() - start < 100 * forward


# -- SS-CAM and IS-CAM ----------------------------------------------------------------------------


def sampled_weights(model: ConvGapFc, x: Tensor, cls: int, inputs_of) -> Tensor:
    """``softmax_k(mean_t y_c(x̃_{k,t}) − y_c(x))`` over non-constant channels, by a plain loop
    (``inputs_of(i, k, mask)`` → the list of perturbed inputs of image ``i``, channel ``k``)."""
    from evidencemap.maps import normalize, upsample

    acts = model.features(x).detach()
    base = model(x).detach()[:, cls]
    weights = torch.zeros(acts.shape[:2])
    for i in range(len(x)):
        valid, changes = [], []
        for k in range(acts.shape[1]):
            a = acts[i, k]
            if float(a.max() - a.min()) <= 1e-12:
                continue
            mask = normalize(upsample(a[None, None], x.shape[2:]))[0]
            ys = [float(model(xt[None])[0, cls].detach()) for xt in inputs_of(i, k, mask)]
            valid.append(k)
            changes.append(sum(ys) / len(ys) - float(base[i]))
        weights[i, valid] = torch.tensor(changes).softmax(0)
    return weights


def test_iscam_matches_its_formula_by_a_loop(case):
    model, x = case
    exp = em.explain(model, x, "iscam", target=1, samples=3, relu=False, internal_batch_size=4)
    coeffs = [0.5 / 3 * t * (t + 1) for t in (1, 2, 3)]  # t(t+1)/(2T): 1/3, 1, 2
    w = sampled_weights(model, x, 1, lambda i, k, m: [c * x[i] * m for c in coeffs])
    acts = model.features(x).detach()
    want = (w.view(*w.shape, *([1] * (acts.ndim - 2))) * acts).sum(1, keepdim=True)
    assert torch.allclose(exp.raw, want, atol=1e-5)


def test_sscam_matches_its_formula_by_a_loop_with_the_same_noise(case):
    model, x = case
    n, spatial = len(x), x.shape[2:]
    exp = em.explain(model, x, "sscam", target=0, samples=2, noise=0.5, noise_seed=7, relu=False)
    acts = model.features(x).detach()
    flat = acts.flatten(2)
    order = flat.var(2).where(flat.amax(2) - flat.amin(2) > 1e-12, float("-inf"))
    order = order.argsort(1, descending=True)

    def noisy(i: int, k: int, mask: Tensor) -> list[Tensor]:
        slot = int((order[i] == k).nonzero())
        return [
            x[i]
            * (
                mask
                + 0.5
                * torch.randn(
                    (n, 1, *spatial), generator=torch.Generator().manual_seed(7 + slot * 2 + t)
                )[i]
            )
            for t in range(2)
        ]

    w = sampled_weights(model, x, 0, noisy)
    want = (w.view(*w.shape, *([1] * (acts.ndim - 2))) * acts).sum(1, keepdim=True)
    assert torch.allclose(exp.raw, want, atol=1e-5)
    again = em.explain(
        model,
        x,
        "sscam",
        target=0,
        samples=2,
        noise=0.5,
        noise_seed=7,
        relu=False,
        internal_batch_size=1,
    )
    assert torch.allclose(again.raw, exp.raw, atol=1e-6)  # the chunks do not change the noise


def torchcam_maps(extractor_cls, model: nn.Module, x: Tensor, cls: int, **kw) -> Tensor:
    with extractor_cls(model, "features.3", input_shape=tuple(x.shape[1:]), **kw) as extractor:
        with torch.no_grad():
            model(x)
        return extractor(class_idx=cls)[0]


@pytest.mark.parametrize("name", ["iscam", "sscam"])
def test_iscam_and_sscam_agree_with_torchcam(name):
    # A layer at input resolution: the masks need no upsampling, so TorchCAM's (normalise, then
    # upsample) and ours (upsample, then normalise) are the same masks. SS-CAM at a noise of
    # 1e-6 (TorchCAM's Normal needs σ > 0): Score-CAM's weights, averaged T times.
    torchcam = pytest.importorskip("torchcam.methods")
    model = seeded(ConvGapFc(width=5), seed=5)
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(3))
    if name == "iscam":
        theirs = torchcam_maps(torchcam.ISCAM, model, x, 2, num_samples=4)
        ours = em.explain(model, x, "iscam", target=2, samples=4, layer="features.3")
    else:
        theirs = torchcam_maps(torchcam.SSCAM, model, x, 2, num_samples=2, std=1e-6)
        ours = em.explain(model, x, "sscam", target=2, samples=2, noise=0.0, layer="features.3")
    assert torch.allclose(ours.maps[:, 0], theirs, atol=1e-4)


# -- Smooth Grad-CAM++ ------------------------------------------------------------------------------


def smooth_gradcampp_by_hand(model: ConvGapFc, x: Tensor, cls: int, samples: int, sigma: float):
    """The formula with a loop over samples and the library's noise (seed 0 + t)."""
    layer = model.features[1]
    acts = model.features[:2](x).detach()
    g1, g2, g3 = (torch.zeros_like(acts) for _ in range(3))
    for t in range(samples):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        a = layer(model.features[0](x + sigma * noise)).detach().requires_grad_(True)
        y = model.fc(model.features[2:](a).mean((2, 3)))[:, cls].sum()
        (g,) = torch.autograd.grad(y, a)
        g1, g2, g3 = g1 + g / samples, g2 + g**2 / samples, g3 + g**3 / samples
    denom = 2 * g2 + (acts * g3).sum((2, 3), keepdim=True)
    alpha = torch.where(denom != 0, g2 / denom.where(denom != 0, 1.0), 0.0)
    w = (alpha * g1.clamp(min=0)).sum((2, 3))
    return (w[:, :, None, None] * acts).sum(1, keepdim=True).clamp(min=0)


def test_smooth_gradcampp_by_a_loop():
    model = seeded(ConvGapFc(), seed=2)
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(5))
    exp = em.explain(model, x, "smoothgradcam++", target=1, layer="features.1", samples=3)
    want = smooth_gradcampp_by_hand(model, x, 1, 3, 0.3)
    assert torch.allclose(exp.raw, want, atol=1e-5)


def test_smooth_gradcampp_agrees_with_torchcam():
    # At σ → 0 TorchCAM's last-sample gradient and the mean gradient are the same. TorchCAM adds
    # 1e-8 to α's denominator (D² is ~1e-6 here), hence agreement to 1e-2, not float rounding.
    torchcam = pytest.importorskip("torchcam.methods")
    model = seeded(ConvGapFc(), seed=2)
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(5))
    with torchcam.SmoothGradCAMpp(
        model, "features.1", num_samples=2, std=1e-6, input_shape=(3, 7, 8)
    ) as extractor:
        out = model(x)
        theirs = extractor(class_idx=1, scores=out)[0]
    ours = em.explain(model, x, "smoothgradcam++", target=1, layer="features.1", noise=0.0)
    assert torch.allclose(ours.maps[:, 0], theirs, atol=1e-2)
    assert pearson(ours.maps[:, 0], theirs) > 0.9999


# -- FullGrad ---------------------------------------------------------------------------------------


class BiasNet(nn.Module):
    """conv(bias) → BN → ReLU → conv(bias) → GAP → linear, 2-D or 3-D."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.body = nn.Sequential(conv(3, 4, 3, padding=1), norm(4), nn.ReLU(), conv(4, 5, 3))
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).flatten(2).mean(2))


def test_fullgrad_by_hand():
    # y = v·mean(w x + b): ∂y/∂x = v w / Z, so the input term is ψ(|x|); ∂y/∂z = v / Z is
    # constant, so the bias term |b v / Z| is flat and ψ makes it 0. M = ψ(|x|).
    model = nn.Sequential(
        nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 1)
    )
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(0.5)
        model[3].weight.fill_(-1.5)
        model[3].bias.zero_()
    exp = em.explain(model.eval(), HAND_X, "fullgrad", target=0)
    want = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]]) / (3.0 + 1e-7)
    assert torch.allclose(exp.raw, want, atol=1e-6)


def pgc_fullgrad(model: nn.Module, x: Tensor, cls: int) -> Tensor:
    """pytorch-grad-cam's ``FullGrad.compute_cam_per_layer``: every channel of every bias layer
    scaled (``v − min``, ``/ (1e-7 + max)``) and resized to the input before the channel sum."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d))
    ]
    outs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m in layers]
    xg = x.clone().requires_grad_(True)
    y = model(xg)[:, cls].sum()
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(y, [xg, *outs])
    mode = "bilinear" if x.ndim == 4 else "trilinear"

    def scale_and_resize(v: Tensor) -> Tensor:  # per image and channel, like its NumPy loop
        out = torch.zeros(*v.shape[:2], *x.shape[2:])
        for i in range(v.shape[0]):
            for c in range(v.shape[1]):
                img = v[i, c] - v[i, c].min()
                img = img / (1e-7 + img.max())
                out[i, c] = F.interpolate(img[None, None], x.shape[2:], mode=mode)[0, 0]
        return out

    total = scale_and_resize((grads[0] * x).abs()).sum(1)
    for layer, g in zip(layers, grads[1:], strict=True):
        if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
            b = layer.bias - layer.running_mean * layer.weight / torch.sqrt(
                layer.running_var + layer.eps
            )
        else:
            b = layer.bias
        total = total + scale_and_resize((b.view(1, -1, *([1] * (g.ndim - 2))) * g).abs()).sum(1)
    return total.detach()


@pytest.mark.parametrize("dims", [2, 3])
def test_fullgrad_matches_pytorch_grad_cam(dims):
    model = seeded(BiasNet(dims), seed=4)
    with torch.no_grad():  # running statistics of their own
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    shape = (2, 3, 9, 10) if dims == 2 else (2, 3, 5, 6, 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    exp = em.explain(model, x, "fullgrad", target=1)
    want = pgc_fullgrad(model, x, 1)
    assert exp.extras["bias_layers"] == 3
    assert torch.allclose(exp.raw[:, 0], want, atol=1e-4)


def test_fullgrad_on_the_real_model(lite0, photos):
    cat = photos[:1]
    grad = em.explain(lite0.module, cat, "gradcam")
    full = em.explain(lite0.module, cat, "fullgrad")
    top = grad.maps >= torch.quantile(grad.maps.flatten(), 0.8)
    assert torch.isfinite(full.maps).all()
    assert float(full.maps[top].mean()) > float(full.maps[~top].mean())
