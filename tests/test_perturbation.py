"""Perturbation methods: hand-computed values, agreement with Captum, the real model on a photo."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import evidencemap as em
from evidencemap.methods.options import OptionError
from evidencemap.methods.perturbation import occlusion_starts, rise_grids, rise_masks
from evidencemap.methods.surrogate import grid_features, kernel_shap_samples, solve_weighted
from tiny import ConvGapFc, seeded


class Linear(nn.Module):
    """``y_k = Σ_{c,s} W_{k,c,s} x_{c,s}``: every perturbation score is a hand-computable sum."""

    def __init__(self, shape: tuple[int, ...], classes: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, *shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.flatten(1).T


def test_occlusion_of_a_linear_model_is_the_mean_contribution_of_the_windows():
    model = Linear((1, 4, 4)).eval()
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    exp = em.explain(model, x, "occlusion", target=0, window=2, stride=2)
    # disjoint 2×2 windows: the drop of a window is the sum of w·x over it, the same on each pixel
    contrib = (model.weight[0, 0] * x[0, 0]).detach()
    want = contrib.view(2, 2, 2, 2).sum((1, 3)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.allclose(exp.raw[0, 0], want, atol=1e-5)
    # overlapping windows (stride 1): the mean over the windows covering each pixel
    exp = em.explain(model, x, "occlusion", target=0, window=2, stride=1)
    sums = torch.nn.functional.avg_pool2d(contrib.view(1, 1, 4, 4), 2, 1) * 4  # (3, 3) windows
    total = torch.zeros(4, 4)
    count = torch.zeros(4, 4)
    for i in range(3):
        for j in range(3):
            total[i : i + 2, j : j + 2] += sums[0, 0, i, j]
            count[i : i + 2, j : j + 2] += 1
    assert torch.allclose(exp.raw[0, 0], total / count, atol=1e-5)


def test_occlusion_windows_cover_the_edges():
    assert occlusion_starts(10, 4, 3) == [0, 3, 6]
    assert occlusion_starts(10, 4, 4) == [0, 4, 8]  # the last window cut at the end
    assert occlusion_starts(3, 8, 2) == [0]  # window clamped to the axis


def test_rise_masks_are_smooth_shifted_grids_with_the_right_density():
    grids, shifts = rise_grids(400, 4, 2, 0.3, seed=5)
    assert grids.shape == (400, 16)
    assert shifts.shape == (400, 2)
    assert abs(float(grids.float().mean()) - 0.3) < 0.03
    masks = rise_masks(grids, shifts, 4, (20, 24))
    assert masks.shape == (400, 1, 20, 24)
    assert float(masks.min()) >= 0
    assert float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.04
    # an all-ones grid is all ones; one kept cell of a 1-cell grid too
    ones = rise_masks(torch.ones(1, 16, dtype=torch.bool), torch.zeros(1, 2), 4, (20, 24))
    assert torch.allclose(ones, torch.ones_like(ones))
    volume = rise_masks(grids[:3, :8], shifts[:3].repeat(1, 2)[:, :3], 2, (6, 8, 10))
    assert volume.shape == (3, 1, 6, 8, 10)


def test_rise_of_a_linear_model_is_the_hand_computed_weighted_mask_sum():
    model = Linear((1, 6, 6)).eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    exp = em.explain(
        model, x, "rise", target=[0, 1], masks=30, cells=3, p=0.4, seed=7, score="logit"
    )
    grids, shifts = rise_grids(30, 3, 2, 0.4, seed=7)
    masks = rise_masks(grids, shifts, 3, (6, 6))  # (30, 1, 6, 6)
    for n, k in enumerate([0, 1]):
        scores = (masks[:, 0] * x[n, 0] * model.weight[k, 0]).sum((1, 2)).detach()
        want = (scores.view(30, 1, 1) * masks[:, 0]).sum(0) / (30 * 0.4)
        assert torch.allclose(exp.raw[n, 0], want, atol=1e-4)
        assert torch.allclose(exp.extras["scores"][n], scores, atol=1e-5)


def test_rise_masks_are_shared_by_the_batch_and_fixed_by_the_seed():
    model = seeded(ConvGapFc())
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    whole = em.explain(model, x, "rise", masks=24, seed=1, internal_batch_size=7)
    alone = em.explain(model, x[1:2], "rise", masks=24, seed=1, internal_batch_size=64)
    assert torch.allclose(whole.raw[1], alone.raw[0], atol=1e-5)
    other = em.explain(model, x[1:2], "rise", masks=24, seed=2)
    assert not torch.allclose(other.raw[0], alone.raw[0])


@pytest.mark.parametrize(
    ("method", "options", "passes"),
    [("rise", {"masks": 24, "seed": 1}, 24), ("occlusion", {"window": 4, "stride": 4}, 9)],
)
def test_one_image_for_several_classes_runs_the_perturbed_passes_once(method, options, passes):
    """A batch repeating one image for its classes (``top_k``) scores every class from one set
    of perturbed passes, with the maps each class gets alone."""
    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        together = em.explain(model, x.repeat(2, 1, 1, 1), method, target=[0, 1], **options)
    finally:
        handle.remove()
    assert sum(rows) == 2 + passes  # the clean pass of the two rows, then one row per mask
    for k in (0, 1):
        alone = em.explain(model, x, method, target=k, **options)
        assert torch.allclose(together.raw[k], alone.raw[0], atol=1e-5)


def test_surrogate_regression_recovers_a_linear_score_exactly():
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(1, 60, 5, generator=gen) < 0.5).double()
    beta = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    y = 0.25 + z[0] @ beta
    w = torch.rand(1, 60, generator=gen, dtype=torch.float64)
    coef, intercept = solve_weighted(z, y.unsqueeze(0), w, alpha=0.0)
    assert torch.allclose(coef[0], beta, atol=1e-7)  # the vanishing ridge: 1e-9 relative
    assert torch.allclose(intercept, torch.tensor([0.25], dtype=torch.float64), atol=1e-7)


def test_kernel_shap_of_a_linear_model_gives_the_exact_shapley_values():
    # for a linear model the Shapley value of a feature is its contribution w·(x − b)
    model = Linear((1, 4, 4)).eval()
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    exp = em.explain(
        model, x, "kernel_shap", target=1, features="grid", cells=2, samples=64, score="logit"
    )
    contrib = (model.weight[1, 0] * x[0, 0]).detach()
    want = contrib.view(2, 2, 2, 2).sum((1, 3)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.allclose(exp.raw[0, 0], want, atol=1e-4)
    assert abs(float(exp.extras["intercept"][0])) < 1e-4  # f(b) = 0 with the zero baseline


def test_kernel_shap_samples_follow_the_shapley_kernel():
    z = kernel_shap_samples(6, 4000, torch.Generator().manual_seed(0))
    assert z[0].all()
    assert not z[1].any()
    k = z[2:].sum(1)
    assert int(k.min()) >= 1
    assert int(k.max()) <= 5
    probs = torch.tensor([5 / (j * (6 - j)) for j in range(1, 6)])
    probs /= probs.sum()
    freq = torch.bincount(k, minlength=6)[1:].float() / len(k)
    assert torch.allclose(freq, probs, atol=0.03)


def test_grid_features_cover_2d_and_3d():
    ids = grid_features((4, 6), 2)
    assert ids.unique().tolist() == [0, 1, 2, 3]
    assert ids[0, 0] == 0
    assert ids[3, 5] == 3
    assert ids[0, 5] == 1
    assert grid_features((4, 4, 4), 2).unique().numel() == 8


def test_bad_options_are_refused_with_clear_messages():
    model = seeded(ConvGapFc())
    with pytest.raises(ValueError, match="window"):
        em.build("occlusion", model, window=(2, 0))
    with pytest.raises(ValueError, match="p"):
        em.build("rise", model, p=0.0)
    with pytest.raises(TypeError, match="integer ids"):
        em.build("lime", model, features=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="do not fit"):
        em.explain(model, torch.randn(1, 3, 8, 8), "lime", features=torch.zeros(5, 5).long())
    with pytest.raises(ValueError, match="2-D"):
        em.explain(seeded(ConvGapFc(dims=3)), torch.randn(1, 3, 4, 4, 4), "lime", features="slic")


# ------------------------------------------------------------------------------ Captum


captum_attr = pytest.importorskip("captum.attr")


@pytest.mark.parametrize("dims", [2, 3])
def test_occlusion_equals_captum_at_the_same_window_and_stride(dims):
    model = seeded(ConvGapFc(dims=dims))
    spatial = (10, 10) if dims == 2 else (6, 8, 8)
    window = (4,) * dims
    stride = (3, 2) if dims == 2 else (2, 3, 2)
    x = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(5))
    ours = em.explain(model, x, "occlusion", target=[1, 2], window=window, stride=stride)
    theirs = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=0, target=[1, 2]
    )
    assert torch.allclose(ours.raw.expand_as(theirs), theirs, atol=1e-5)


def _captum_surrogate(cls, model, x, feature_mask, z, **kwargs):
    """Captum's LIME / KernelSHAP fed our samples ``z`` ``(S, F)`` in order."""

    def samples(_inputs, **_kw):
        for row in z:
            yield row.long().unsqueeze(0)

    method = cls(model, **kwargs)
    method.perturb_func = samples
    return method.attribute(
        x, target=0, feature_mask=feature_mask, n_samples=len(z), perturbations_per_eval=16
    )


def test_lime_solves_the_same_model_as_captum_on_the_same_samples():
    from captum._utils.models.linear_model import SkLearnRidge

    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    lime = em.build(
        "lime", model, samples=80, features="grid", cells=2, alpha=0.5, score="logit", seed=3
    )
    ours = lime(x, 0)
    z = lime.draw(4, torch.Generator().manual_seed(3))
    mask = grid_features((8, 8), 2).view(1, 1, 8, 8)
    theirs = _captum_surrogate(
        captum_attr.Lime, model, x, mask, z, interpretable_model=SkLearnRidge(alpha=0.5)
    )
    assert torch.allclose(ours.raw[0, 0], theirs[0, 0], atol=1e-4, rtol=1e-3)


def test_kernel_shap_solves_the_same_model_as_captum_on_the_same_samples():
    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    shap = em.build(
        "kernel_shap", model, samples=60, features="grid", cells=2, score="logit", seed=4
    )
    ours = shap(x, 0)
    z = shap.draw(4, torch.Generator().manual_seed(4))
    mask = grid_features((8, 8), 2).view(1, 1, 8, 8)
    theirs = _captum_surrogate(captum_attr.KernelShap, model, x, mask, z)
    assert torch.allclose(ours.raw[0, 0], theirs[0, 0], atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------ real photo


CAT_BOX = (slice(56, 168), slice(0, 112))
"""Where the cat goes: chelsea's crop (a cat's face that fills the photo) is shrunk to 112 × 112
and put on the left of a 224 × 224 canvas of the data mean (0 in the model's input space)."""


def cat_on_canvas(photo: torch.Tensor) -> torch.Tensor:
    canvas = torch.zeros(1, *photo.shape)
    small = torch.nn.functional.interpolate(photo[None], size=(112, 112), mode="area")
    canvas[0, :, CAT_BOX[0], CAT_BOX[1]] = small[0]
    return canvas


def cat_box_energy(maps: torch.Tensor) -> float:
    """Share of the map's mass inside the cat's box (a quarter of the canvas)."""
    m = maps[0, 0]
    return float(m[CAT_BOX].sum() / m.sum().clamp(min=1e-12))


@pytest.mark.parametrize(
    ("name", "options", "passes", "energy"),
    [
        ("occlusion", {"window": 56, "stride": 56}, 16, 0.5),
        # 64 masks are a noisy estimate (the paper uses thousands): more mass on the cat than
        # its share of the area, no more
        ("rise", {"masks": 64}, 64, 0.25),
        ("lime", {"samples": 48}, 48, 0.5),
    ],
)
def test_the_real_model_points_at_the_cat(lite0, photos, name, options, passes, energy):
    cat = cat_on_canvas(photos[0])
    start = time.perf_counter()
    with torch.no_grad():
        lite0.module(cat.expand(8, -1, -1, -1))
    one = (time.perf_counter() - start) / 8  # a forward pass of one image, now, on this machine
    start = time.perf_counter()
    exp = em.explain(lite0.module, cat, name, **options)
    elapsed = time.perf_counter() - start
    assert int(exp.targets[0]) in range(281, 286)  # still a cat
    assert cat_box_energy(exp.maps) > energy, cat_box_energy(exp.maps)  # the box: 0.25
    assert elapsed < 3 * (passes + 2) * one + 1.0  # its passes and little else


def test_occlusion_refuses_more_boxes_than_max_windows_before_any_pass():
    calls: list[int] = []

    class Counting(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return super().forward(x)

    model = Counting((1, 64, 64)).eval()
    x = torch.randn(1, 1, 64, 64)
    # window 8, stride 1: 57 × 57 = 3249 boxes, under the default of 4096
    assert em.build("occlusion", model, window=8, stride=1).layout((64, 64))[1][0].numel() == 57
    with pytest.raises(ValueError, match=r"3249 boxes .* over max_windows=1000"):
        em.explain(model, x, "occlusion", window=8, stride=1, max_windows=1000)
    assert calls == []  # refused before the first forward pass
    # 3-D counts every axis: 5 × 5 × 5 = 125 boxes
    vol = Counting((1, 8, 8, 8)).eval()
    with pytest.raises(ValueError, match="125 boxes"):
        em.explain(
            vol, torch.randn(1, 1, 8, 8, 8), "occlusion", window=4, stride=1, max_windows=100
        )
    exp = em.explain(
        vol, torch.randn(1, 1, 8, 8, 8), "occlusion", window=4, stride=1, max_windows=125
    )
    assert int(exp.extras["windows"][0]) == 125
    # a service refuses a larger max_windows than its cap
    with pytest.raises(OptionError, match="max_windows=5000 is over"):
        em.build("occlusion", model, caps={}, max_windows=5000)
