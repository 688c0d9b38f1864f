"""The CAM family against hand-computed maps and their formulas on tiny deterministic models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import evidencemap as em
from evidencemap.maps import normalize, upsample
from evidencemap.methods import LayerMethod
from evidencemap.methods.base import FlatMapWarning
from tiny import ConvGapFc, seeded

# From the registry: every built-in layer method (the CAM family).
CAM_METHODS = [
    n
    for n in em.methods()
    if issubclass(em.describe(n).cls, LayerMethod)
    and em.describe(n).cls.__module__.startswith("evidencemap.")
]


def _acts_and_grads(model: ConvGapFc, x: torch.Tensor, classes: torch.Tensor):
    """A = features(x) and g = ∂y_c/∂A computed independently of the library."""
    acts = model.features(x).detach().requires_grad_(True)
    logits = model.fc(acts.mean(dim=tuple(range(2, acts.ndim))))
    score = logits[torch.arange(x.shape[0]), classes].sum()
    (grads,) = torch.autograd.grad(score, acts)
    return acts.detach(), grads


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def case(request):
    dims = request.param
    torch.manual_seed(1)
    model = seeded(ConvGapFc(dims=dims), seed=dims)
    shape = (3, 3, 9, 10) if dims == 2 else (2, 3, 5, 6, 7)
    x = torch.randn(shape)
    return model, x


def test_cam_is_fc_weighted_sum_by_hand():
    # One channel pair, hand-set weights: CAM = w0·A0 + w1·A1 for the chosen class.
    model = ConvGapFc(channels=1, width=2, classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.features[2].weight[0, 0, 1, 1] = 1.0  # channel 0 copies channel 0 of layer 1
        model.features[2].weight[1, 1, 1, 1] = 1.0
        model.features[0].weight[0, 0, 1, 1] = 1.0  # layer 1: ch0 = relu(x), ch1 = relu(-x)
        model.features[0].weight[1, 0, 1, 1] = -1.0
        model.fc.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 3.0]]))
    x = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])
    exp = em.explain(model, x, "cam", target=0, layer="features.3")
    a0, a1 = x.clamp(min=0), (-x).clamp(min=0)
    expected = (2.0 * a0 - 1.0 * a1).clamp(min=0)  # [[2, 0], [0, 6]]
    assert torch.allclose(exp.raw, expected)
    assert torch.allclose(exp.maps, torch.tensor([[[[1 / 3, 0.0], [0.0, 1.0]]]]))


def test_hirescam_equals_cam_and_gradcam_is_proportional(case):
    model, x = case
    cam = em.explain(model, x, "cam", target=1)
    hires = em.explain(model, x, "hirescam", target=1)
    grad = em.explain(model, x, "gradcam", target=1)
    z = cam.raw[0, 0].numel()
    # On conv → GAP → FC nets g = w_c / Z everywhere, so HiResCAM = CAM / Z and Grad-CAM = CAM / Z.
    assert torch.allclose(hires.raw * z, cam.raw, atol=1e-5)
    assert torch.allclose(grad.raw * z, cam.raw, atol=1e-5)
    assert torch.allclose(hires.maps, cam.maps, atol=1e-5)
    assert torch.allclose(grad.maps, cam.maps, atol=1e-5)


def test_gradient_methods_match_their_formulas(case):
    model, x = case
    classes = torch.arange(x.shape[0]) % 4
    acts, g = _acts_and_grads(model, x, classes)
    sp = tuple(range(2, acts.ndim))
    gradcam = (g.mean(sp, keepdim=True) * acts).sum(1, keepdim=True).clamp(min=0)
    sum_a = acts.sum(sp, keepdim=True)
    denom = 2 * g**2 + sum_a * g**3
    alpha = torch.where(
        denom != 0,
        g**2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
        torch.zeros_like(g),
    )
    w_pp = (alpha * g.clamp(min=0)).sum(sp, keepdim=True)
    gradcampp = (w_pp * acts).sum(1, keepdim=True).clamp(min=0)
    w_x = (acts / (sum_a + 1e-7) * g).sum(sp, keepdim=True)
    xgrad = (w_x * acts).sum(1, keepdim=True).clamp(min=0)
    layercam = (g.clamp(min=0) * acts).sum(1, keepdim=True).clamp(min=0)
    hires = (g * acts).sum(1, keepdim=True).clamp(min=0)
    expected = {
        "gradcam": gradcam,
        "gradcam++": gradcampp,
        "xgradcam": xgrad,
        "layercam": layercam,
        "hirescam": hires,
    }
    for name, raw in expected.items():
        exp = em.explain(model, x, name, target=classes.tolist())
        assert exp.raw.shape == (x.shape[0], 1, *x.shape[2:])
        assert torch.allclose(exp.raw, raw, atol=1e-6), name
        assert torch.allclose(exp.maps, normalize(upsample(raw, x.shape[2:])), atol=1e-6), name
        assert torch.equal(exp.targets, classes)


def test_counterfactual_negates_gradcam_weights(case):
    model, x = case
    acts, g = _acts_and_grads(model, x, torch.zeros(x.shape[0], dtype=torch.long))
    sp = tuple(range(2, acts.ndim))
    expected = (-g.mean(sp, keepdim=True) * acts).sum(1, keepdim=True).clamp(min=0)
    exp = em.GradCAM(model, counterfactual=True)(x, 0)
    assert torch.allclose(exp.raw, expected, atol=1e-6)
    via_target = em.explain(model, x, "gradcam", target=em.targets.Counterfactual(0))
    assert torch.allclose(via_target.raw, expected, atol=1e-6)
    assert torch.equal(via_target.targets, torch.zeros(x.shape[0], dtype=torch.long))


def test_eigencam_is_first_principal_component(case):
    model, x = case
    exp = em.explain(model, x, "eigencam", relu=False)
    acts = model.features(x).detach()
    for i in range(x.shape[0]):
        m = acts[i].flatten(1).T.double()  # (Z, K)
        c = m - m.mean(0)
        _, _, vh = torch.linalg.svd(c, full_matrices=False)
        proj = c @ vh[0]
        energy = m.mean(1)
        if float((proj * (energy - energy.mean())).sum()) < 0:
            proj = -proj
        assert torch.allclose(exp.raw[i].flatten().double(), proj, atol=1e-4)


def test_scorecam_matches_the_official_loop(case):
    model, x = case
    exp = em.explain(model, x, "scorecam", target=2, internal_batch_size=5)
    acts = model.features(x).detach()
    for i in range(x.shape[0]):
        total = torch.zeros(acts.shape[2:])
        for k in range(acts.shape[1]):
            a = acts[i, k]
            if float(a.max() - a.min()) <= 1e-12:
                continue
            up = upsample(a[None, None], x.shape[2:])[0, 0]
            mask = (up - up.min()) / (up.max() - up.min())
            prob = model(x[i : i + 1] * mask).softmax(1)[0, 2]
            total += prob * a
        assert torch.allclose(exp.raw[i, 0], total.clamp(min=0), atol=1e-5)


def test_scorecam_chunking_topk_and_weightings(case):
    model, x = case
    one = em.explain(model, x, "scorecam", internal_batch_size=1000)
    small = em.explain(model, x, "scorecam", internal_batch_size=1)
    budget = em.explain(model, x, "scorecam", memory_budget=x[0].numel() * 4 * 2)
    assert torch.allclose(one.raw, small.raw, atol=1e-6)
    assert torch.allclose(one.raw, budget.raw, atol=1e-6)
    top = em.explain(model, x, "scorecam", top_k=2)
    assert top.maps.shape == one.maps.shape
    assert torch.isfinite(top.maps).all()
    acts = model.features(x).detach()
    for weighting in ("channel_softmax", "delta_softmax"):
        exp = em.explain(model, x, "scorecam", weighting=weighting, target=0)
        out = model(x)
        # Reference: softmax over channels of the target logit on each masked input.
        for i in range(x.shape[0]):
            logits = []
            for k in range(acts.shape[1]):
                up = upsample(acts[i, k][None, None], x.shape[2:])[0, 0]
                mask = normalize(up[None])[0]
                logits.append(model(x[i : i + 1] * mask)[0, 0])
            s = torch.stack(logits)
            if weighting == "delta_softmax":
                s = s - out[i, 0]
            valid = (acts[i].flatten(1).amax(1) - acts[i].flatten(1).amin(1)) > 1e-12
            w = s.masked_fill(~valid, float("-inf")).softmax(0).masked_fill(~valid, 0)
            expected = (w.view(-1, *([1] * (acts.ndim - 2))) * acts[i]).sum(0).clamp(min=0)
            assert torch.allclose(exp.raw[i, 0], expected, atol=1e-5), weighting


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_in_2d_and_3d(case, method):
    model, x = case
    exp = em.explain(model, x, method)
    assert exp.maps.shape == (x.shape[0], 1, *x.shape[2:])
    assert exp.maps.dtype == x.dtype
    assert exp.maps.device == x.device
    assert torch.isfinite(exp.maps).all()
    assert float(exp.maps.min()) >= 0
    assert float(exp.maps.max()) <= 1
    assert exp.layer == "features.3"
    assert exp.raw.shape[2:] == x.shape[2:]  # padding keeps the layer at input size here
    assert torch.equal(exp.targets, model(x).argmax(1))
    assert torch.allclose(exp.scores, model(x).max(1).values, atol=1e-6)


def test_upsampling_is_bilinear_or_trilinear_without_corner_alignment():
    raw2 = torch.rand(2, 1, 3, 4)
    raw3 = torch.rand(2, 1, 3, 4, 5)
    assert torch.equal(
        upsample(raw2, (6, 8)), F.interpolate(raw2, (6, 8), mode="bilinear", align_corners=False)
    )
    assert torch.equal(
        upsample(raw3, (6, 8, 10)),
        F.interpolate(raw3, (6, 8, 10), mode="trilinear", align_corners=False),
    )


def test_flat_maps_are_zeros_not_nan():
    flat = torch.full((3, 1, 4, 4), 2.5)
    assert torch.equal(normalize(flat), torch.zeros_like(flat))
    model = seeded(ConvGapFc())
    with torch.no_grad():
        model.fc.weight.zero_()  # no evidence for any class: every gradient is zero
    exp = em.explain(model, torch.randn(2, 3, 6, 6), "gradcam")
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))


# ------------------------------------------------------------------------------ flat maps


def test_a_flat_map_warns_with_why_and_what_to_try():
    model = seeded(ConvGapFc())
    with torch.no_grad():
        model.fc.weight.zero_()  # no evidence for any class: every gradient is zero
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(FlatMapWarning, match=r"gradcam: the map of samples 0, 1 is flat") as got:
        exp = em.explain(model, x, "gradcam")
    message = str(got[0].message)
    assert "relu=False" in message
    assert "another layer" in message
    assert exp.extras["degenerate"].tolist() == [True, True]
    assert exp.warning(0) == message  # shown with the figure, as FGVis' warning is


def test_counterfactual_gradcam_without_negative_evidence_warns_and_relu_false_shows_it():
    """conv → ReLU → GAP → linear with positive weights: every gradient is positive, so the
    counterfactual map (negated gradients) has no positive position and ReLU zeroes it."""
    model = seeded(ConvGapFc())
    with torch.no_grad():
        model.fc.weight.abs_()
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with pytest.warns(FlatMapWarning, match="counterfactual=True keeps negative evidence only"):
        exp = em.explain(model, x, "gradcam", counterfactual=True)
    assert float(exp.maps.abs().max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlatMapWarning)
        signed = em.explain(model, x, "gradcam", counterfactual=True, relu=False)
        em.explain(model, x, "gradcam")  # the plain map has evidence: no warning
    assert float(signed.maps.max()) == 1.0
    assert "degenerate" not in signed.extras


def test_a_method_inside_another_does_not_warn_per_chunk():
    model = seeded(ConvGapFc())
    with torch.no_grad():
        model.fc.weight.zero_()
    x = torch.randn(1, 3, 6, 6)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        em.explain(model, x, "smoothgrad", wrap="gradcam", samples=3)
    assert not [w for w in got if issubclass(w.category, FlatMapWarning)]


def test_counterfactual_gradcam_on_the_builtin_model_and_a_real_photo_warns():
    from evidencemap import models
    from gradients_helpers import load_photos

    model = models.load("efficientnet-lite0")
    x = load_photos(model, ("chelsea",))
    with pytest.warns(FlatMapWarning, match="counterfactual=True") as got:
        exp = em.explain(model, x, "gradcam", counterfactual=True)
    assert "try relu=False" in str(got[0].message)
    assert float(exp.maps.max()) == 0.0
    signed = em.explain(model, x, "gradcam", counterfactual=True, relu=False)
    assert float(signed.maps.max()) == 1.0
