"""Input x Gradient, Deconvnet, DeepLIFT (rescale) and GradientSHAP: hand computations on a
tiny model, agreement with Captum at matched settings (tiny models in 2-D and 3-D, the built-in
pretrained model on a real photo), completeness and error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution as CaptumDeconvolution
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import GradientShap as CaptumGradientShap
from captum.attr import InputXGradient as CaptumInputXGradient
from torch import nn

import evidencemap as em
from evidencemap.methods.attribution import gradient_shap_draws
from gradients_helpers import SmallNet, captum_compatible
from tiny import seeded


class OneHidden(nn.Module):
    """x (2 channels) → 1×1 conv (3, bias b) → F.relu (functional) → sum: hand-checkable.

    W = [[1, 0], [0, 1], [1, −1]], b = (−0.5, 0, 0).
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.c1.weight.copy_(
                torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).view(3, 2, 1, 1)
            )
            self.c1.bias.copy_(torch.tensor([-0.5, 0.0, 0.0]))

    def forward(self, x):
        return F.relu(self.c1(x)).sum(dim=(1, 2, 3)).unsqueeze(1)


X_HAND = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)


def test_four_methods_by_hand():
    """x = (1, 2): u = Wx + b = (0.5, 2, −1), h = (0.5, 2, 0), y = 2.5; r = 0: u_r = (−0.5, 0,
    0), h_r = 0, F(r) = 0.

    gradient      ∂y/∂x = Wᵀ 1[u > 0] = Wᵀ(1, 1, 0) = (1, 1)  → x⊙∇ = (1, 2), Σ = 3 ≠ 2.5
    deconvnet     R = max(1, 0) at every unit: Wᵀ(1, 1, 1) = (2, 0)
    deeplift      secants Δh/Δu = (0.5/1, 2/2, 0/−1) = (0.5, 1, 0) → Wᵀ(.) = (0.5, 1)
                  → (x − 0)⊙ = (0.5, 2), Σ = 2.5 = F(x) − F(r)
    """
    model = OneHidden()
    ixg = em.explain(model, X_HAND, "input_x_gradient", target=0)
    assert torch.allclose(ixg.raw.flatten(), torch.tensor([1.0, 2.0]))
    deconv = em.explain(model, X_HAND, "deconvnet", target=0)
    assert torch.allclose(deconv.raw.flatten(), torch.tensor([2.0, 0.0]))
    dl = em.explain(model, X_HAND, "deeplift", target=0)
    assert torch.allclose(dl.raw.flatten(), torch.tensor([0.5, 2.0]))
    assert float(dl.extras["completeness_gap"].abs().max()) < 1e-6
    assert float(dl.extras["baseline_score"][0]) == 0.0
    # GradientSHAP with one zero baseline and no noise: (x − 0) ⊙ ∇F(α x), α from the draws;
    # along this path u(α) = αWx + b: unit 0 is active for α > 0.5 only
    shap = em.explain(model, X_HAND, "gradient_shap", target=0, samples=3, seed=2)
    draws = list(gradient_shap_draws(X_HAND, 3, 1, torch.zeros(1), 2, 3))
    alphas = draws[0][2]
    expected = sum(
        torch.tensor([1.0 * (a > 0.5) + 0.0, 1.0]) * torch.tensor([1.0, 2.0]) for a in alphas
    )
    assert torch.allclose(shap.raw.flatten(), expected / 3)


@pytest.mark.parametrize("dims", [2, 3])
def test_tiny_models_match_captum(dims):
    model = seeded(SmallNet(dims=dims))
    spatial = (6, 6) if dims == 2 else (4, 5, 5)
    x = torch.randn(3, 3, *spatial, generator=torch.Generator().manual_seed(dims))
    target = torch.tensor([0, 2, 1])
    ref = CaptumInputXGradient(model).attribute(x.clone(), target=target)
    assert torch.allclose(em.explain(model, x, "input_x_gradient", target=target).raw, ref)
    ref = CaptumDeconvolution(model).attribute(x.clone(), target=target)
    got = em.explain(model, x, "deconvnet", target=target)
    assert torch.allclose(got.raw, ref, atol=1e-6)
    assert torch.allclose(got.maps, em.maps.normalize(ref.abs().amax(1, keepdim=True)), atol=1e-5)
    for baseline in (torch.zeros_like(x), 0.3 * torch.randn_like(x)):
        ref = CaptumDeepLift(model).attribute(x.clone(), baselines=baseline, target=target)
        got = em.explain(model, x, "deeplift", target=target, baseline=baseline)
        assert torch.allclose(got.raw, ref, atol=1e-5)
        assert got.extras["completeness_relative"].max() < 1e-4  # exact on a ReLU net


def test_gradient_shap_matches_captum_given_the_same_draws(monkeypatch):
    model = seeded(SmallNet())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    bases = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    target, samples, sigma, seed = torch.tensor([1, 3]), 5, 0.1, 7
    got = em.explain(
        model,
        x,
        "gradient_shap",
        target=target,
        baselines=bases,
        samples=samples,
        sigma=sigma,
        seed=seed,
        internal_batch_size=4,
    )
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    ((eps, index, alpha),) = gradient_shap_draws(x, samples, 4, sigma * span, seed, samples)
    # Captum's rows are sample-major (repeat_interleave): row i·n + j is copy j of sample i
    noise = eps.transpose(0, 1).reshape(-1, *x.shape[1:])
    monkeypatch.setattr(torch, "normal", lambda *a, **k: noise.clone())
    monkeypatch.setattr(np.random, "choice", lambda *a, **k: index.repeat(2).numpy())
    monkeypatch.setattr(np.random, "uniform", lambda *a, **k: alpha.repeat(2).double().numpy())
    ref = CaptumGradientShap(model).attribute(
        x.clone(), baselines=bases, target=target, n_samples=samples, stdevs=1.0
    )
    assert torch.allclose(got.raw, ref, atol=1e-5)
    # the draws are per copy, so the result does not depend on the chunking or the batch
    again = em.explain(
        model,
        x[1:],
        "gradient_shap",
        target=target[1:],
        baselines=bases,
        samples=samples,
        sigma=sigma,
        seed=seed,
        internal_batch_size=1,
    )
    assert torch.allclose(again.raw, got.raw[1:], atol=1e-6)


def test_deeplift_handles_functional_and_reused_activations():
    """One nn.ReLU module called twice and a functional relu: Captum cannot hook these; the
    per-call rule keeps completeness exact."""

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1)
            self.act, self.fc = nn.ReLU(), nn.Linear(5, 2)

        def forward(self, x):
            h = self.act(self.b(self.act(self.a(x))))
            return self.fc(torch.relu(h - 0.1).mean((2, 3)))

    model = seeded(Reused())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    exp = em.explain(model, x, "deeplift", baseline="blur", blur_sigma=1.0)
    assert exp.extras["completeness_relative"].max() < 1e-4
    plain = em.explain(model, x, "input_x_gradient", target=exp.targets)
    assert not torch.allclose(plain.raw, exp.raw, atol=1e-3)


def test_error_paths():
    model = seeded(SmallNet())
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="sign"):
        em.explain(model, x, "input_x_gradient", sign="both")
    with pytest.raises(ValueError, match="baselines"):
        em.explain(model, x, "gradient_shap", baselines=torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="nonlinearities"):
        em.explain(model, x, "deconvnet", nonlinearities=["nope"])
    with pytest.raises(ValueError, match="baseline"):
        em.explain(model, x, "deeplift", baseline="nope")


# --------------------------------------------------------------------------------------------
# The built-in pretrained model on a real photo


def test_builtin_model_on_a_real_photo(lite0, photos):
    """DeepLIFT's completeness on Lite0 (ReLU6, no squeeze-excitation): exact to rounding."""
    x = photos[:1]
    target = torch.tensor([282])  # tiger cat
    dl = em.explain(lite0, x, "deeplift", target=target)
    assert float(dl.extras["completeness_relative"][0]) < 1e-3
    assert float(dl.extras["completeness_gap"][0].abs()) < 1e-3
    assert torch.isfinite(dl.maps).all()
    assert float(dl.maps.max()) == 1.0


@pytest.mark.slow
def test_builtin_model_matches_captum(lite0, photos, monkeypatch):
    import captum.attr._core.deep_lift as captum_deep_lift

    x = photos[:1]
    target = torch.tensor([282])
    ixg = em.explain(lite0, x, "input_x_gradient", target=target)
    sal = em.explain(lite0, x, "saliency", target=target, abs=False)
    assert torch.allclose(ixg.raw, sal.raw * x, atol=1e-6)  # Input x Gradient = saliency·x
    ref = CaptumInputXGradient(lite0).attribute(x.clone(), target=target)
    assert torch.allclose(ixg.raw, ref, atol=1e-6)
    # Deconvnet: Captum hooks nn.ReLU only; compare on the twin whose ReLU6 are nn.ReLU
    deconv = em.explain(lite0, x, "deconvnet", target=target)
    ref = CaptumDeconvolution(captum_compatible(lite0)).attribute(x.clone(), target=target)
    assert torch.allclose(deconv.raw, ref, atol=1e-5 * float(ref.abs().max()))
    # DeepLIFT: Captum's rule table has no nn.ReLU6; give it its own rescale rule for ReLU6
    monkeypatch.setitem(captum_deep_lift.SUPPORTED_NON_LINEAR, nn.ReLU6, captum_deep_lift.nonlinear)
    dl = em.explain(lite0, x, "deeplift", target=target)
    ref = CaptumDeepLift(lite0).attribute(x.clone(), baselines=torch.zeros_like(x), target=target)
    assert torch.allclose(dl.raw, ref, atol=1e-4 * float(ref.abs().max()))


# --------------------------------------------------------------------------------------------
# VarGrad and SmoothGrad²: SmoothGrad's other aggregations


@pytest.mark.parametrize(
    ("name", "nt_type"), [("vargrad", "vargrad"), ("smoothgrad_sq", "smoothgrad_sq")]
)
def test_noise_tunnel_variants_match_captum_given_the_same_noise(monkeypatch, name, nt_type):
    from captum.attr import NoiseTunnel
    from captum.attr import Saliency as CaptumSaliency

    from evidencemap.methods.gradients import smoothgrad_noise

    model = seeded(SmallNet())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    samples, sigma, seed = 6, 0.2, 3
    got = em.explain(model, x, name, samples=samples, sigma=sigma, seed=seed, internal_batch_size=4)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    noise = next(smoothgrad_noise(x, samples, sigma * span, seed))  # (n, N, C, *S)
    # by hand: the copies' |∂y/∂x|, then E[g²] and E[g²] − E[g]²
    grads = torch.stack(
        [CaptumSaliency(model).attribute(x + noise[i], target=got.targets) for i in range(samples)]
    )
    by_hand = grads.pow(2).mean(0) - (grads.mean(0) ** 2 if name == "vargrad" else 0)
    assert torch.allclose(got.raw, by_hand, atol=1e-6)
    assert torch.allclose(got.maps, em.maps.normalize(by_hand.amax(1, keepdim=True)), atol=1e-5)
    # Captum's NoiseTunnel with the same noise (its rows are sample-major)
    rows = noise.transpose(0, 1).reshape(-1, *x.shape[1:])
    monkeypatch.setattr(torch, "normal", lambda *a, **k: rows.clone())
    ref = NoiseTunnel(CaptumSaliency(model)).attribute(
        x.clone(), nt_type=nt_type, nt_samples=samples, stdevs=1.0, target=got.targets
    )
    assert torch.allclose(got.raw, ref, atol=1e-6)
    assert got.options["aggregate"] == ("variance" if name == "vargrad" else "square")
    # the same as SmoothGrad with the aggregate option
    same = em.explain(
        model,
        x,
        "smoothgrad",
        samples=samples,
        sigma=sigma,
        seed=seed,
        aggregate=got.options["aggregate"],
    )
    assert torch.allclose(same.raw, got.raw, atol=1e-7)


def test_vargrad_of_a_layer_method_and_of_zero_noise():
    model = seeded(SmallNet())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    exp = em.explain(model, x, "vargrad", wrap="gradcam", samples=3, sigma=0.1)
    assert exp.maps.shape == (2, 1, 6, 6)
    assert torch.isfinite(exp.maps).all()
    flat = em.explain(model, x, "vargrad", samples=3, sigma=0.0)  # no noise: no variance
    sq = em.explain(model, x, "smoothgrad_sq", samples=2, sigma=0.0)
    plain = em.explain(model, x, "saliency")
    assert float(flat.raw.abs().max()) < 1e-6 * float(plain.raw.max()) ** 2
    assert torch.allclose(sq.raw, plain.raw**2, atol=1e-7)
