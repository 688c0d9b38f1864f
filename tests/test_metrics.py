"""The evaluation metrics on cases with a known answer, on the real model, and their error paths."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity
from torch import nn

import evidencemap as em
from evidencemap import metrics as M
from evidencemap.metrics import road as road_module
from evidencemap.targets import ClassProbability
from metrics_helpers import BoxModel, box_map, plane, random_maps, sigmoid
from tiny import ConvGapFc, assert_unchanged, seeded, snapshot

BOX2 = (slice(2, 5), slice(2, 5))  # 9 positions of an 8 × 8 image
BOX3 = (slice(1, 3), slice(2, 4), slice(2, 5))  # 12 positions of a 4 × 6 × 6 volume


def box_case(spatial, box, n=2, seed=0):
    """Inputs that are 1 inside the box and random elsewhere, the box model, the box map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, *spatial), generator=gen)
    x[(slice(None), slice(None), *box)] = 1.0
    return x, BoxModel(spatial, box), box_map(spatial, box, n)


# ---------------------------------------------------------------- metadata


def test_every_metric_states_its_direction():
    expected = {
        "deletion": False,
        "insertion": True,
        "region_deletion": False,
        "average_drop": False,
        "adcc": True,
        "pointing_game": True,
        "energy_pointing_game": True,
        "road": True,
        "sanity": False,
        "max_sensitivity": False,
        "cost": False,
    }
    assert {name: cls.higher_is_better for name, cls in M.METRICS.items()} == expected
    for cls in M.METRICS.values():
        assert cls.directions, cls.name
        assert cls.supports_volumes, cls.name  # every metric is defined on volumes
        # the columns the evaluation tables show are the ones the metric describes, and its
        # first column is its main value
        assert list(cls.titles) == list(cls.directions), cls.name
        assert next(iter(cls.directions.values())) is cls.higher_is_better, cls.name
    assert M.AverageDrop.directions == {"average_drop": False, "increase_in_confidence": True}
    assert M.ROAD.directions["road_morf"] is False
    assert M.ROAD.directions["road_lerf"] is True


# ---------------------------------------------------------------- AUC, blur


def test_auc_by_hand():
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
    # trapezoids on [0, 0.5, 1]: (1 + 0.5)/2·0.5 + (0.5 + 0)/2·0.5 = 0.5; 0.25 + 0.5 = 0.75
    assert M.auc(curves).tolist() == pytest.approx([0.5, 0.75])
    # RISE's form (Σ s − s0/2 − sT/2) / T on a uniform axis
    s = torch.tensor([[0.9, 0.7, 0.4, 0.2, 0.1]])
    rise = (s.sum() - s[0, 0] / 2 - s[0, -1] / 2) / 4
    assert float(M.auc(s)) == pytest.approx(float(rise))
    uneven = torch.tensor([0.0, 0.8, 1.0])  # a last, shorter step
    assert float(M.auc(torch.tensor([[1.0, 1.0, 0.0]]), uneven)) == pytest.approx(0.8 + 0.1)
    with pytest.raises(ValueError, match="T >= 1"):
        M.auc(torch.ones(2, 1))
    with pytest.raises(ValueError, match="fractions must have shape"):
        M.auc(torch.ones(2, 3), torch.linspace(0, 1, 4))


def test_gaussian_blur_matches_scipy_2d_and_3d():
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 20, 17), (1, 2, 12, 13, 14)]:
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
        ours = M.gaussian_blur(x)  # 11 taps, sigma 5, zero padding
        # scipy: radius = int(truncate·σ + 0.5) = 5 taps each side, zero outside
        ref = np.stack(
            [
                [ndimage.gaussian_filter(c, 5.0, truncate=1.0, mode="constant") for c in img]
                for img in x.numpy()
            ]
        )
        assert np.allclose(ours.numpy(), ref, atol=1e-12)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        M.gaussian_blur(torch.ones(1, 1, 4, 4), sigma=0.0)


# ---------------------------------------------------------------- deletion / insertion


@pytest.mark.parametrize(("spatial", "box"), [((8, 8), BOX2), ((4, 6, 6), BOX3)])
def test_deletion_and_insertion_curves_by_hand(spatial, box):
    x, model, good = box_case(spatial, box)
    b, p = good[0].sum().item(), math.prod(spatial)
    deletion = M.Deletion(model, step=1)(x, good, target=0)
    insertion = M.Insertion(model, step=1, substrate="zero")(x, good, target=0)
    assert deletion.curves.shape == (2, p + 1)
    assert deletion.fractions.tolist() == pytest.approx([k / p for k in range(p + 1)])
    # the box goes first: after k steps the box mean is (b − k)/b (deletion), k/b (insertion)
    expect_del = [sigmoid(4 * (max(b - k, 0) / b - 0.5)) for k in range(p + 1)]
    expect_ins = [sigmoid(4 * (min(k, b) / b - 0.5)) for k in range(p + 1)]
    for i in range(2):
        assert deletion.curves[i].tolist() == pytest.approx(expect_del, abs=1e-6)
        assert insertion.curves[i].tolist() == pytest.approx(expect_ins, abs=1e-6)
    assert deletion.auc.tolist() == pytest.approx(
        [float(M.auc(torch.tensor([expect_del])))] * 2, abs=1e-6
    )
    assert deletion.classes.tolist() == [0, 0]
    # the box map wins both games against random maps
    for seed in range(3):
        rand = random_maps(good.shape, seed)
        assert (M.Deletion(model, step=1)(x, rand, 0).auc > deletion.auc).all()
        assert (M.Insertion(model, step=1, substrate="zero")(x, rand, 0).auc < insertion.auc).all()


def test_deletion_batches_and_steps_agree():
    x, model, good = box_case((8, 8), BOX2, n=3)
    maps = good + 0.1 * random_maps(good.shape, 1)
    whole = M.Deletion(model, step=5, batch_size=1000)(x, maps, 0)
    chunked = M.Deletion(model, step=5, batch_size=4)(x, maps, 0)
    assert torch.allclose(whole.curves, chunked.curves)
    # ceil(64 / 5) = 13 steps, the last one shorter
    assert whole.curves.shape == (3, 14)
    assert whole.fractions[-2:].tolist() == pytest.approx([60 / 64, 1.0])
    # maps given as (N, *S), at another resolution, or as an Explanation give the same ranking
    same = M.Deletion(model, step=5)(x, maps[:, 0], 0)
    assert torch.allclose(same.curves, whole.curves)
    small = torch.zeros(3, 1, 4, 4)
    small[:, :, 1:3, 1:3] = 1.0  # upsampled to 8 × 8 its peak covers the box's centre
    assert M.Deletion(model, step=1)(x, small, 0).curves.shape == (3, 65)
    # a callable target is used as is: the logit instead of the probability
    logit = M.Deletion(model, step=64)(x, maps, lambda out: out[:, 0])
    assert logit.classes is None
    assert logit.curves[:, 0].tolist() == pytest.approx(
        (4 * (model.box_mean(x) - 0.5)).tolist(), abs=1e-5
    )
    assert logit.curves[:, 1].tolist() == pytest.approx([-2.0] * 3, abs=1e-5)  # everything zero
    prob = M.Deletion(model, step=64)(x, maps, ClassProbability(0))
    assert torch.allclose(prob.curves, M.Deletion(model, step=64)(x, maps, 0).curves)


def test_substrates():
    x, model, good = box_case((8, 8), BOX2)
    assert torch.equal(M.Insertion(model).substrate_of(x), M.gaussian_blur(x))
    assert torch.equal(M.Deletion(model).substrate_of(x), torch.zeros_like(x))
    mean = M.Deletion(model, substrate="mean").substrate_of(x)
    assert torch.allclose(mean[:, :, 0, 0], x.mean((2, 3)))
    assert torch.equal(M.Deletion(model, substrate=0.25).substrate_of(x), torch.full_like(x, 0.25))
    grey = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.equal(
        M.Deletion(model, substrate=grey).substrate_of(x)[1, :, 4, 4], grey.flatten()
    )
    # deleting everything into a substrate of 0.5 leaves the box mean at 0.5: p = sigmoid(0)
    run = M.Deletion(model, step=64, substrate=0.5)(x, good, 0)
    assert run.curves[:, -1].tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="does not broadcast"):
        M.Deletion(model, substrate=torch.zeros(2, 2)).substrate_of(x)


def test_real_model_gradcam_beats_its_inverse_on_deletion_and_insertion(lite0, photos):
    coffee = photos[1:]
    maps = em.GradCAM(lite0)(coffee).maps
    step = 224 * 56  # 4 steps (a quarter of the image each) keep the test short
    deletion = M.Deletion(lite0, step=step)
    insertion = M.Insertion(lite0, step=step)
    run = deletion(coffee, maps)
    assert float(run.auc[0]) < float(deletion(coffee, 1 - maps).auc[0])
    assert float(insertion(coffee, maps).auc[0]) > float(insertion(coffee, 1 - maps).auc[0])
    assert run.classes.tolist() == [967]  # espresso
    assert float(run.curves[0, 0]) == pytest.approx(float(lite0.predict(coffee)[0, 967]), abs=1e-4)


@pytest.mark.slow
def test_real_model_gradcam_beats_random_and_inverse_maps_on_finer_curves(lite0, photos):
    maps = em.GradCAM(lite0)(photos).maps
    # a random map as coarse as Grad-CAM's 7 × 7 layer; pixel-wise random maps are no fair
    # baseline for deletion: scattered zeroed pixels destroy the prediction fastest
    coarse = torch.nn.functional.interpolate(
        random_maps((2, 1, 7, 7), 0), size=(224, 224), mode="bilinear"
    )
    step = 224 * 8  # 28 steps: RISE's curve (step 224) sampled every 8th point
    deletion = M.Deletion(lite0, step=step)
    good = deletion(photos, maps).auc
    assert (good < deletion(photos, 1 - maps).auc).all()
    assert (good < deletion(photos, coarse).auc).all()
    # insertion on the espresso (p = 0.95); on chelsea (tiger cat at p = 0.39, sharing its mass
    # with 281 / 285) Grad-CAM's map of 282 measures 0.21 against 0.24 for its inverse
    insertion = M.Insertion(lite0, step=step)
    good = insertion(photos[1:], maps[1:]).auc
    assert float(good) > float(insertion(photos[1:], 1 - maps[1:]).auc)
    assert float(good) > float(insertion(photos[1:], coarse[1:]).auc)


# ---------------------------------------------------------------- average drop, ADCC


def test_average_drop_and_increase_by_hand():
    spatial = (8, 8)
    model = BoxModel(spatial, BOX2)
    x = torch.zeros(2, 3, *spatial)
    x[(0, slice(None), *BOX2)] = 1.0  # box mean 1: Y = sigmoid(2)
    x[(1, slice(None), *BOX2)] = -1.0  # box mean −1: Y = sigmoid(−6)
    half = torch.full((2, 1, *spatial), 0.5)  # E = x / 2
    res = M.AverageDrop(model)(x, half, target=0)
    y = [sigmoid(2), sigmoid(-6)]
    o = [sigmoid(0), sigmoid(-4)]
    assert res.original.tolist() == pytest.approx(y)
    assert res.explained.tolist() == pytest.approx(o)
    assert res.drop.tolist() == pytest.approx([100 * (y[0] - o[0]) / y[0], 0.0])
    assert res.increase.tolist() == [0.0, 100.0]
    assert res.classes.tolist() == [0, 0]
    # maps outside [0, 1] cannot make an explanation image
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        M.AverageDrop(model)(x, half * 3, target=0)


def test_adcc_by_hand():
    spatial = (8, 8)
    x, model, good = box_case(spatial, BOX2)
    calls = []

    def explainer(inputs, target):
        calls.append((inputs.clone(), target))
        return good  # the same map on the explanation image: coherency 1

    res = M.ADCC(model)(x, good, explainer, target=0)
    torch.testing.assert_close(calls[0][0], x * good)  # re-run on E = s ⊙ x
    assert calls[0][1].tolist() == [0, 0]  # for the classes scored
    com = 9 / 64
    assert res.average_drop.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # the box is kept
    assert res.coherency.tolist() == pytest.approx([1.0, 1.0])
    assert res.complexity.tolist() == pytest.approx([com, com])
    assert res.adcc.tolist() == pytest.approx([3 / (1 + 1 / (1 - com) + 1)] * 2, abs=1e-6)
    # an inverted map on the re-run: ρ = −1, coherency 0, ADCC 0
    flipped = M.ADCC(model)(x, good, lambda inputs, target: 1 - good, target=0)
    assert flipped.coherency.tolist() == pytest.approx([0.0, 0.0])
    assert flipped.adcc.tolist() == [0.0, 0.0]
    # a map of ones: complexity 1 → ADCC 0, never NaN
    ones = torch.ones_like(good)
    full = M.ADCC(model)(x, ones, lambda inputs, target: ones, target=0)
    assert full.adcc.tolist() == [0.0, 0.0]
    assert full.coherency.tolist() == [0.5, 0.5]  # ρ of a flat map is 0
    with pytest.raises(TypeError, match="explainer must be a callable"):
        M.ADCC(model)(x, good, "gradcam")


def test_adcc_with_a_library_method_on_the_real_model(lite0, photos):
    cat = photos[:1]
    method = em.GradCAM(lite0)
    exp = method(cat)
    res = M.ADCC(lite0)(cat, exp, method)
    assert res.classes.tolist() == [282]
    for value in (res.adcc, res.coherency, res.complexity, res.average_drop):
        assert value.shape == (1,)
        assert 0 <= float(value) <= 1
    assert float(res.complexity) == pytest.approx(float(exp.maps.mean()), abs=1e-6)


# ---------------------------------------------------------------- pointing game


def test_pointing_game_hits_misses_and_tolerance():
    maps = torch.zeros(4, 1, 32, 32)
    maps[0, 0, 6, 22] = 1.0  # inside the box [x0=20, y0=4, x1=24, y1=8]
    maps[1, 0, 20, 5] = 1.0  # far away
    maps[2, 0, 10, 24] = 1.0  # 14 px right of the one-pixel box at (row 10, col 10): hit
    maps[3, 0, 10, 25] = 1.0  # 15 px: a miss (distance must be < τ)
    gt = [[20, 4, 24, 8], [20, 4, 24, 8], [10, 10, 11, 11], [[10, 10, 11, 11], [0, 31, 1, 32]]]
    res = M.PointingGame()(maps, gt)
    assert res.hits.tolist() == [True, False, True, False]
    assert res.points.tolist() == [[6, 22], [20, 5], [10, 24], [10, 25]]
    assert res.accuracy == pytest.approx(0.5)
    # mean over classes, not over maps: class 0 → 1/2, class 1 → 1/2, class 2 → 1
    res = M.PointingGame()(maps[[0, 1, 2, 3, 0]], [*gt, gt[0]], classes=[0, 0, 1, 1, 2])
    assert res.per_class == {0: 0.5, 1: 0.5, 2: 1.0}
    assert res.accuracy == pytest.approx(2 / 3)
    assert M.PointingGame(tolerance=1)(maps[2:3], [gt[2]]).hits.tolist() == [False]
    assert M.PointingGame(tolerance=20)(maps[3:4], [gt[3]]).hits.tolist() == [True]
    # a flat map points nowhere
    assert M.PointingGame()(torch.zeros(1, 32, 32), [[0, 0, 32, 32]]).hits.tolist() == [False]


def test_pointing_game_box_map_beats_random_maps_and_masks_equal_boxes():
    box = (slice(20, 28), slice(4, 10))  # rows 20..27, cols 4..9 of 48 × 48
    gt_box = [[4, 20, 10, 28]] * 8
    mask = torch.zeros(8, 48, 48, dtype=torch.bool)
    mask[:, 20:28, 4:10] = True
    good = box_map((48, 48), box, 8) * random_maps((8, 1, 48, 48), 0)
    rand = random_maps((8, 1, 48, 48), 1)
    game = M.PointingGame(tolerance=3)
    assert game(good, gt_box).accuracy == 1.0
    assert game(rand, gt_box).accuracy < 0.5  # 8·14 of 48² positions lie within 3 px: ≈ 10 %
    assert torch.equal(M.ground_truth_masks(gt_box, (48, 48)), mask)
    assert torch.equal(game(rand, mask).hits, game(rand, gt_box).hits)
    energy = M.EnergyPointingGame()
    assert energy(box_map((48, 48), box, 2), mask[:2]).tolist() == [1.0, 1.0]
    assert energy(torch.ones(2, 1, 48, 48), mask[:2]).tolist() == pytest.approx([48 / 48**2] * 2)
    assert energy(torch.zeros(1, 48, 48), mask[:1]).tolist() == [0.0]


def test_pointing_game_on_volumes():
    maps = torch.zeros(2, 1, 6, 20, 20)
    maps[0, 0, 3, 5, 12] = 1.0
    maps[1, 0, 0, 19, 0] = 1.0
    box = [10, 4, 2, 14, 8, 5]  # [x0, y0, z0, x1, y1, z1]: cols 10..13, rows 4..7, slices 2..4
    res = M.PointingGame(tolerance=1)(maps, [box, box])
    assert res.hits.tolist() == [True, False]
    assert res.points[0].tolist() == [3, 5, 12]
    mask = M.ground_truth_masks([box], (6, 20, 20))
    assert int(mask.sum()) == 4 * 4 * 3
    assert bool(mask[0, 2:5, 4:8, 10:14].all())
    assert M.EnergyPointingGame()(maps, [box, box]).tolist() == [1.0, 0.0]


def test_pointing_errors():
    game = M.PointingGame()
    with pytest.raises(TypeError, match="maps must be"):
        game(np.zeros((1, 8, 8)), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="tolerance must be a number > 0"):
        M.PointingGame(tolerance=0)
    with pytest.raises(TypeError, match="tolerance must be a number"):
        M.PointingGame(tolerance="15")
    with pytest.raises(ValueError, match="boxes of 4 numbers"):
        game(torch.zeros(1, 8, 8), [[0, 0, 1]])
    with pytest.raises(ValueError, match="upper corner below"):
        game(torch.zeros(1, 8, 8), [[5, 5, 1, 1]])
    with pytest.raises(ValueError, match="covers no pixel"):
        game(torch.zeros(1, 8, 8), [[20, 20, 30, 30]])
    with pytest.raises(ValueError, match="2 entries but maps has 1"):
        game(torch.zeros(1, 8, 8), [[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="integer class indices"):
        game(torch.zeros(1, 8, 8), [[0, 0, 1, 1]], classes=[0.5])
    with pytest.raises(ValueError, match="NaN"):
        game(torch.full((1, 8, 8), float("nan")), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="non-negative"):
        M.EnergyPointingGame()(-torch.ones(1, 8, 8), [[0, 0, 1, 1]])


# ---------------------------------------------------------------- ROAD


def direct_imputation(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The noisy-linear-imputation system solved by scipy's sparse solver (2-D, one channel)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    h, w = img.shape
    index = {pos: i for i, pos in enumerate(zip(*np.nonzero(removed), strict=True))}
    a = sp.lil_matrix((len(index), len(index)))
    b = np.zeros(len(index))
    for (r, c), i in index.items():
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr, dc) == (0, 0) or not (0 <= rr < h and 0 <= cc < w):
                    continue
                weight = 1 / 6 if 0 in (dr, dc) else 1 / 12
                a[i, i] += weight
                if (rr, cc) in index:
                    a[i, index[(rr, cc)]] -= weight
                else:
                    b[i] += weight * img[rr, cc]
    out = img.copy()
    for (r, c), value in zip(index, spl.spsolve(a.tocsr(), b), strict=True):
        out[r, c] = value
    return out


def test_imputation_solves_the_published_system():
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(1, 1, 20, 20, generator=gen, dtype=torch.float64)
    removed = torch.rand(1, 1, 20, 20, generator=gen) < 0.6  # borders and large holes included
    ours = M.noisy_linear_impute(img, removed, noise=0.0, tol=1e-12)
    ref = direct_imputation(img[0, 0].numpy(), removed[0, 0].numpy())
    assert np.abs(ours[0, 0].numpy() - ref).max() < 1e-10


@pytest.mark.parametrize("shape", [(3, 2, 48, 40), (2, 1, 10, 12, 14)])
def test_imputation_reproduces_a_plane_and_is_batched(shape):
    x = plane(shape).float()
    gen = torch.Generator().manual_seed(0)
    removed = torch.rand((shape[0], 1, *shape[2:]), generator=gen) < torch.tensor(
        [0.3, 0.9, 0.6][: shape[0]]
    ).view(-1, *[1] * (len(shape) - 1))
    interior = torch.zeros_like(removed)
    interior[(slice(None), slice(None), *[slice(1, -1)] * (len(shape) - 2))] = True
    removed &= interior  # a plane is the exact solution when every hole has a kept border
    out = M.noisy_linear_impute(x, removed, noise=0.0, tol=1e-7)
    assert (out - x).abs().max() < 1e-4  # values ~0.1–1: float32 CG to 1e-7 relative
    assert torch.equal(
        out[~removed.expand_as(out)], x[~removed.expand_as(x)]
    )  # kept values untouched
    # one batched solve = one solve per image
    alone = torch.cat(
        [
            M.noisy_linear_impute(x[i : i + 1], removed[i : i + 1], noise=0.0, tol=1e-7)
            for i in range(shape[0])
        ]
    )
    assert (alone - out).abs().max() < 1e-5
    # the noise: σ = 0.01 on the imputed values only
    noisy = M.noisy_linear_impute(x, removed, generator=torch.Generator().manual_seed(1))
    diff = (noisy - out)[removed.expand_as(out)]
    assert float(diff.std()) == pytest.approx(0.01, rel=0.1)
    assert torch.equal(noisy[~removed.expand_as(out)], x[~removed.expand_as(x)])


def test_imputation_converges_in_few_fine_iterations_on_a_large_hole():
    # a 90 % removal of a 224 × 224 image: the coarse-to-fine first guess leaves little to do
    x = plane((1, 1, 224, 224)).float()
    removed = torch.rand((1, 1, 224, 224), generator=torch.Generator().manual_seed(0)) < 0.9
    out = M.noisy_linear_impute(x, removed, noise=0.0)
    assert road_module._LAST_ITERATIONS[0] < 300  # plain Jacobi-CG needs thousands here
    inner = (slice(None), slice(None), slice(20, -20), slice(20, -20))
    assert (out - x)[inner].abs().max() < 0.05  # the plane's range is ≈ 6


def test_imputation_errors():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(TypeError, match="removed must be a boolean"):
        M.noisy_linear_impute(x, torch.zeros(1, 1, 8, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        M.noisy_linear_impute(x.long(), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="removed must be"):
        M.noisy_linear_impute(x, torch.zeros(1, 1, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        M.noisy_linear_impute(torch.zeros(1, 3, 8), torch.zeros(1, 1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        M.noisy_linear_impute(x, torch.zeros(1, 1, 8, 8, dtype=torch.bool), noise=-1.0)


@pytest.mark.parametrize(
    ("spatial", "box"),
    [
        ((16, 16), (slice(4, 10), slice(4, 10))),
        ((6, 10, 10), (slice(1, 5), slice(3, 7), slice(3, 7))),
    ],
)
def test_road_box_map_beats_random_maps(spatial, box):
    x = torch.zeros((2, 3, *spatial))
    x[(slice(None), slice(None), *box)] = 1.0
    model = BoxModel(spatial, box)
    good = box_map(spatial, box, 2)
    road = M.ROAD(model, batch_size=7)
    res = road(x, good, target=0)
    levels = len(M.road.DEFAULT_PERCENTILES)
    assert res.morf.shape == (2, levels)
    assert res.lerf.shape == (2, levels)
    assert res.percentiles.tolist() == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert res.original.tolist() == pytest.approx([sigmoid(2)] * 2)
    # LeRF removes background only up to 100 % − box share: the score barely moves
    share = good[0].mean().item()
    untouched = res.percentiles <= 100 * (1 - share) - 10
    assert res.lerf[:, untouched].abs().max() < 0.05
    assert (res.morf[:, -1] < -0.3).all()  # the box is gone at 90 %
    torch.testing.assert_close(res.combined, ((res.lerf - res.morf) / 2).mean(1))
    rand = road(x, random_maps(good.shape, 3), target=0)
    assert (res.combined > rand.combined + 0.1).all()
    again = M.ROAD(model, batch_size=36)(x, good, target=0)  # other chunks, same seed: same noise
    torch.testing.assert_close(again.combined, res.combined, atol=2e-3, rtol=0)


def test_road_errors():
    model = BoxModel((8, 8), BOX2)
    with pytest.raises(ValueError, match="percentiles must lie in"):
        M.ROAD(model, percentiles=[0, 50])
    with pytest.raises(TypeError, match="percentiles must be a non-empty sequence"):
        M.ROAD(model, percentiles=50)
    with pytest.raises(TypeError, match="percentiles must be a non-empty sequence"):
        M.ROAD(model, percentiles=[])
    with pytest.raises(ValueError, match="tol must be a number > 0"):
        M.ROAD(model, tol=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        M.ROAD(model, batch_size=0)


# ---------------------------------------------------------------- similarity


def test_similarity_against_scipy_and_skimage():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 1, 16, 16), generator=gen).float()  # many ties
    b = a + torch.randint(0, 3, (3, 1, 16, 16), generator=gen).float()
    ours = M.spearman(a, b)
    for i in range(3):
        ref = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
        assert float(M.pearson(a, b)[i]) == pytest.approx(
            stats.pearsonr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-6
        )
    x, y = torch.rand(2, 1, 24, 20, generator=gen), torch.rand(2, 1, 24, 20, generator=gen)
    y = (x + 0.3 * y).clamp(0, 1)
    for i in range(2):
        ref = structural_similarity(
            x[i, 0].numpy().astype(np.float64),
            y[i, 0].numpy().astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert float(M.ssim(x, y)[i]) == pytest.approx(ref, abs=1e-5)
    vol = torch.rand(1, 1, 12, 12, 12, generator=gen)
    assert float(M.ssim(vol, vol)) == pytest.approx(1.0)
    assert M.spearman(torch.ones(1, 1, 4, 4), vol[:, :, 0, :4, :4]).tolist() == [
        0.0
    ]  # flat: 0, not NaN
    with pytest.raises(ValueError, match="same shape"):
        M.pearson(a, b[:2])


# ---------------------------------------------------------------- sanity check


def test_randomisation_lowers_gradcam_similarity_on_the_real_model(lite0, photos):
    cat = photos[:1]
    before = snapshot(lite0)
    sanity = M.ModelRandomisation(lite0, stages=3)
    res = sanity(cat, em.GradCAM(lite0))
    assert_unchanged(lite0, before)  # parameters bitwise, flags, hooks
    assert res.spearman.shape == (1, 3)
    assert res.ssim.shape == (1, 3)
    assert res.layers[0] != res.layers[-1]
    assert res.layers[-1] == "_conv_stem"  # the cascade ends at the first layer
    assert float(res.spearman[0, -1]) < 0.5
    assert float(res.ssim[0, -1]) < float(M.ssim(res.original, res.original))
    # the original maps are those of the untouched model
    torch.testing.assert_close(res.original, em.GradCAM(lite0)(cat, 282).maps)


def test_randomisation_restores_the_model_when_the_explainer_raises():
    model = seeded(ConvGapFc())
    model.train()
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = [0]

    def explainer(inputs, target):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("explainer failed")
        return em.GradCAM(model)(inputs, target)

    with pytest.raises(RuntimeError, match="explainer failed"):
        M.ModelRandomisation(model)(x, explainer)
    assert_unchanged(model, before)
    assert model.training
    # without failure: one stage per layer from the logits down, all restored
    res = M.ModelRandomisation(model)(x, em.GradCAM(model))
    assert res.layers == ["fc", "features.2", "features.0"]
    assert M.parameter_layers(model, x) == ["features.0", "features.2", "fc"]
    assert_unchanged(model, before)


def test_randomisation_on_volumes_and_errors():
    model = seeded(ConvGapFc(dims=3))
    x = torch.randn(1, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    res = M.ModelRandomisation(model, stages=2)(x, em.GradCAM(model))
    assert res.spearman.shape == (1, 2)
    assert res.original.shape == (1, 1, 6, 6, 6)
    with pytest.raises(ValueError, match="stages"):
        M.ModelRandomisation(model, stages=0)
    with pytest.raises(TypeError, match="explainer must be a callable"):
        M.ModelRandomisation(model)(x, None)
    with pytest.raises(ValueError, match="no parameters"):
        M.ModelRandomisation(nn.Sequential(nn.Flatten(), nn.Identity()))(x, lambda i, t: i[:, :1])


# ---------------------------------------------------------------- max-sensitivity


def test_max_sensitivity_constant_explainer_and_growth_with_radius():
    model = seeded(ConvGapFc())
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def constant(inputs, target):
        return torch.ones(inputs.shape[0], 1, *inputs.shape[2:])

    assert M.MaxSensitivity(model)(x, constant).tolist() == [0.0, 0.0, 0.0]

    def channel_mean(inputs, target):  # Φ(x) = mean over channels: ‖Φ(x + δ) − Φ(x)‖ = ‖mean_c δ‖
        return inputs.mean(1, keepdim=True)

    small = M.MaxSensitivity(model, radius=0.02)(x, channel_mean)
    large = M.MaxSensitivity(model, radius=0.04)(x, channel_mean)
    torch.testing.assert_close(large, 2 * small)  # same seed: the same δ scaled
    assert (small > 0).all()
    assert (small <= 0.02 * 8).all()  # ‖δ‖_F ≤ r·sqrt(64)
    chunked = M.MaxSensitivity(model, radius=0.02, batch_size=4)(x, channel_mean)
    torch.testing.assert_close(chunked, small)
    relative = M.MaxSensitivity(model, radius=0.02, relative=True)(x, channel_mean)
    torch.testing.assert_close(relative, small / x.mean(1).flatten(1).norm(dim=1))
    gradcam = em.GradCAM(model)
    values = [M.MaxSensitivity(model, radius=r)(x, gradcam).mean() for r in (0.001, 0.1, 1.0)]
    assert values[0] < values[1] < values[2]


def test_max_sensitivity_on_volumes_and_errors():
    model = seeded(ConvGapFc(dims=3))
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    seen = []

    def explainer(inputs, target):
        seen.append(target)
        return inputs.mean(1)  # (N, *S) is accepted

    res = M.MaxSensitivity(model, samples=4)(x, explainer)
    assert res.shape == (2,)
    predicted = model(x).argmax(1)
    assert seen[0].tolist() == predicted.tolist()
    assert seen[1].tolist() == predicted.repeat(4).tolist()  # perturbed copies: the same classes
    with pytest.raises(ValueError, match="radius must be a number >= 0"):
        M.MaxSensitivity(model, radius=-0.1)
    with pytest.raises(ValueError, match="radius must be a number"):
        M.MaxSensitivity(model, radius=float("inf"))
    with pytest.raises(ValueError, match="samples"):
        M.MaxSensitivity(model, samples=0)
    with pytest.raises(TypeError, match="relative must be true or false"):
        M.MaxSensitivity(model, relative=1)
    with pytest.raises(ValueError, match="the explainer's maps"):
        M.MaxSensitivity(model)(x, lambda inputs, target: inputs[:1, :1])


# ---------------------------------------------------------------- cost


def test_cost_measures_time_and_memory():
    def call():
        big = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        time.sleep(0.05)
        return float(big[-1])

    result, cost = M.Cost(warmup=1)(call, images=5)
    assert result == 1.0
    assert cost.seconds_per_image >= 0.05 / 5
    assert cost.memory_kind == "cpu_malloc_sampled"
    assert cost.peak_bytes >= 24 * 2**20  # the sampled allocation peak saw most of the tensor
    with M.PeakMemory() as memory:
        pass
    assert memory.peak_bytes is not None
    with pytest.raises(TypeError, match="call must be a callable"):
        M.Cost()(42)
    with pytest.raises(ValueError, match="images"):
        M.Cost()(call, images=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        M.Cost(warmup=-1)
    with pytest.raises(TypeError, match="warmup must be an int"):
        M.Cost(warmup=1.5)


# ---------------------------------------------------------------- shared argument checks


def test_common_argument_errors():
    x, model, good = box_case((8, 8), BOX2)
    deletion = M.Deletion(model)
    with pytest.raises(TypeError, match=r"maps must be a torch\.Tensor or an Explanation"):
        deletion(x, good.numpy())
    with pytest.raises(ValueError, match="maps has 1 maps but the inputs have 2"):
        deletion(x, good[:1])
    with pytest.raises(ValueError, match="spatial axes"):
        deletion(x, good.unsqueeze(1))
    with pytest.raises(ValueError, match="NaN"):
        deletion(x, good * float("nan"))
    with pytest.raises(TypeError, match="inputs"):
        deletion(x.numpy(), good)
    with pytest.raises(ValueError, match="class indices"):
        deletion(x, good, target=5)
    with pytest.raises(ValueError, match="one score per row"):
        deletion(x, good, target=lambda out: out.sum())
    with pytest.raises(ValueError, match="substrate must be one of"):
        M.Deletion(model, substrate="noise")
    with pytest.raises(TypeError, match="substrate must be one of"):
        M.Deletion(model, substrate=[0.0])
    with pytest.raises(ValueError, match="step"):
        M.Insertion(model, step=0)
    with pytest.raises(TypeError, match="model"):
        M.Deletion("resnet")
