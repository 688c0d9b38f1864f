"""CF-CAM step by step on constructed feature maps, against an independent NumPy/loop
reference of the released algorithm, plus the gradient-noise option of the shared pipeline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.cluster import DBSCAN

import evidencemap as em
from evidencemap.filters import gaussian_filter, mirror_indices
from evidencemap.methods.cfcam import (
    IMPORTANT,
    NOISE,
    channel_scores,
    cluster_channels,
    dbscan_parameters,
    percentile,
    released_filter,
    softmax_weights,
    split_channels,
)
from gradients_helpers import ControlledLayer, SmallNet, load_photos
from tiny import assert_unchanged, seeded, snapshot

# --------------------------------------------------------------------------------------------
# An independent reference of the released algorithm: NumPy, scikit-learn on the raw features
# (Euclidean metric, not a precomputed matrix) and explicit loops for the filter.


def released_filter_loops(g: np.ndarray, sigma_s: float = 5.0, sigma_r: float = 0.1) -> np.ndarray:
    """``W(p) = exp(−‖p − shape/2‖²/(2σ_s²))·exp(−(g(p) − mean g)²/(2σ_r²))``, ``W /= ΣW + 1e-6``,
    zero-padded 'same' cross-correlation (``⌊(L−1)/2⌋`` cells before each axis), any rank."""
    shape = g.shape
    mean = g.mean()
    kernel = np.zeros(shape)
    for p in itertools.product(*[range(n) for n in shape]):
        d2 = sum((p[a] - shape[a] / 2) ** 2 for a in range(len(shape)))
        kernel[p] = math.exp(-d2 / (2 * sigma_s**2)) * math.exp(
            -((g[p] - mean) ** 2) / (2 * sigma_r**2)
        )
    kernel /= kernel.sum() + 1e-6
    before = [(n - 1) // 2 for n in shape]
    out = np.zeros(shape)
    for p in itertools.product(*[range(n) for n in shape]):
        total = 0.0
        for u in itertools.product(*[range(n) for n in shape]):
            q = tuple(p[a] + u[a] - before[a] for a in range(len(shape)))
            if all(0 <= q[a] < shape[a] for a in range(len(shape))):
                total += kernel[u] * g[q]
        out[p] = total
    return out


def cfcam_reference(acts: np.ndarray, grads: np.ndarray, filt) -> tuple[np.ndarray, np.ndarray]:
    """One image: channel weights ``(K,)`` and labels, following the published steps."""
    k = acts.shape[0]
    feats = acts.reshape(k, -1).astype(np.float64)
    norms = np.linalg.norm(feats, axis=1)
    important = norms >= np.percentile(norms, 75)
    rest = np.flatnonzero(~important)
    labels = np.full(k, IMPORTANT)
    if rest.size:
        sub = feats[rest]
        dist = np.sqrt(((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1))  # fine at test sizes
        off = dist[~np.eye(rest.size, dtype=bool)]
        eps = max(np.percentile(off, 25), 1e-5) if off.size else 1e-5
        min_samples = max(2, int(0.05 * rest.size))
        labels[rest] = DBSCAN(eps=eps, min_samples=min_samples).fit(sub).labels_
    scores = np.zeros(k)
    for c in range(k):
        if labels[c] == IMPORTANT:
            scores[c] = grads[c].mean()
    for j in range(labels.max() + 1):
        members = np.flatnonzero(labels == j)
        filtered = filt(grads[members].mean(0))
        scores[members] = filtered.mean()
    valid = labels != NOISE
    weights = np.zeros(k)
    e = np.exp(scores[valid] - scores[valid].max())
    weights[valid] = e / e.sum()
    return weights, labels


# --------------------------------------------------------------------------------------------
# A constructed layer: 3 strong channels, two tight clusters of 4, one far-away channel.

DELTA = 0.05  # spacing of the cluster members along one direction


def constructed_acts(seed: int = 0, size: tuple[int, ...] = (4, 4)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = math.prod(size)
    p1, p2, p3, e = (torch.randn(z, generator=gen, dtype=torch.float64) for _ in range(4))
    p1, p2, p3, e = (v / v.norm() for v in (p1, p2, p3, e))
    strong = [
        (10 + 5 * i) * torch.randn(z, generator=gen, dtype=torch.float64) / z**0.5 for i in range(3)
    ]
    cluster_a = [p1 + DELTA * i * e for i in range(4)]
    cluster_b = [p2 + DELTA * i * e for i in range(4)]
    far = [3 * p3]
    chans = [strong[0], *cluster_a[:2], far[0], strong[1], *cluster_b, *cluster_a[2:], strong[2]]
    return torch.stack(chans).view(1, 12, *size)


# channel order of constructed_acts
STRONG = [0, 4, 11]
CLUSTER_A = [1, 2, 9, 10]
CLUSTER_B = [5, 6, 7, 8]
FAR = [3]


def test_percentile_matches_numpy():
    v = torch.randn(3, 17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for q in (0.0, 25.0, 75.0, 100.0, 33.3):
        assert torch.allclose(
            percentile(v, q), torch.from_numpy(np.percentile(v.numpy(), q, axis=1))
        )


def test_split_keeps_the_top_quarter_by_norm():
    acts = constructed_acts()
    important = split_channels(acts)
    assert important[0].nonzero().flatten().tolist() == STRONG
    # tau = percentile 75 of the 12 norms, computed by hand: position 0.75·11 = 8.25
    norms = acts.flatten(2).norm(dim=2)[0].sort().values
    tau = norms[8] + 0.25 * (norms[9] - norms[8])
    assert bool((acts.flatten(2).norm(dim=2)[0][STRONG] >= tau).all())


def test_dbscan_parameters_from_the_distances_of_the_rest():
    acts = constructed_acts()
    rest = [c for c in range(12) if c not in STRONG]
    flat = acts[0].flatten(1)[rest]
    eps, min_samples = dbscan_parameters(torch.cdist(flat, flat))
    # 72 ordered pairs: 12 at DELTA, 8 at 2·DELTA, 4 at 3·DELTA, 48 far; position 0.25·71 = 17.75
    # lies among the 2·DELTA pairs.
    assert eps == pytest.approx(2 * DELTA, rel=1e-9)
    assert min_samples == 2  # max(2, ⌊0.05·9⌋)
    big = torch.zeros(100, 100)
    assert dbscan_parameters(big) == (1e-5, 5)  # floor of eps; ⌊0.05·100⌋
    assert dbscan_parameters(torch.zeros(1, 1)) == (1e-5, 2)


def test_clusters_and_noise_channels_are_found():
    acts = constructed_acts()
    groups = cluster_channels(acts, split_channels(acts))
    labels = groups.labels[0]
    assert labels[STRONG].tolist() == [IMPORTANT] * 3
    assert labels[FAR].tolist() == [NOISE]
    assert len(set(labels[CLUSTER_A].tolist())) == 1
    assert len(set(labels[CLUSTER_B].tolist())) == 1
    assert {int(labels[CLUSTER_A[0]]), int(labels[CLUSTER_B[0]])} == {0, 1}
    assert groups.clusters.tolist() == [2]
    assert groups.eps[0] == pytest.approx(2 * DELTA, rel=1e-9)


def test_cluster_scores_average_then_filter_then_mean():
    acts = constructed_acts()
    groups = cluster_channels(acts, split_channels(acts))
    grads = torch.arange(12 * 16, dtype=torch.float64).view(1, 12, 4, 4) / 100
    seen = []

    def double_corner(maps):
        seen.append(maps.clone())
        out = maps.clone()
        out[:, 0, 0] *= 2
        return out

    scores = channel_scores(grads, groups.labels, double_corner)[0]
    (received,) = seen
    assert received.shape == (2, 4, 4)  # both clusters filtered in one call
    for members in (CLUSTER_A, CLUSTER_B):
        mean = grads[0, members].mean(0)
        expected = (mean.sum() + mean[0, 0]) / 16
        assert torch.allclose(scores[members], expected.expand(4))
    assert torch.allclose(scores[STRONG], grads[0, STRONG].flatten(1).mean(1))
    assert scores[FAR].tolist() == [0.0]
    weights = softmax_weights(scores.unsqueeze(0), groups.labels)[0]
    valid = [c for c in range(12) if c not in FAR]
    assert torch.allclose(weights[valid], torch.softmax(scores[valid], 0))
    assert weights[FAR].tolist() == [0.0]
    assert float(weights.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(5, 5), (7, 7), (4, 6), (3, 4, 5)])
def test_released_filter_matches_the_formula(shape):
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, *shape, generator=gen, dtype=torch.float64) * 0.1
    ours = released_filter(g)
    for j in range(3):
        ref = released_filter_loops(g[j].numpy())
        assert np.allclose(ours[j].numpy(), ref, atol=1e-12)
    wide = released_filter(g, sigma_spatial=2.0, sigma_range=0.3)[0].numpy()
    assert np.allclose(wide, released_filter_loops(g[0].numpy(), 2.0, 0.3), atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 7), (6, 9), (5, 6, 7)])
@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_gaussian_filter_matches_scipy_mirror(shape, sigma):
    maps = torch.randn(
        2, 3, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    ours = gaussian_filter(maps, sigma)
    ref = ndimage.gaussian_filter(maps.numpy(), sigma=(0, 0, *[sigma] * len(shape)), mode="mirror")
    assert np.allclose(ours.numpy(), ref, atol=1e-12)
    const = torch.full((1, 1, *shape), 3.0)
    assert torch.allclose(gaussian_filter(const, sigma), const)


def test_mirror_indices_any_radius():
    assert mirror_indices(4, 5).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert mirror_indices(1, 2).tolist() == [0] * 5


@pytest.mark.parametrize("filt", ["released", "gaussian", "none"])
def test_cfcam_end_to_end_matches_the_reference(filt):
    """Explained layer = the input itself, ``∂y/∂A`` = a known read-out: the whole method
    against the reference on the constructed maps and on random ones, batched."""
    acts = torch.cat([constructed_acts(0), constructed_acts(5)]).float()
    acts[1] = acts[1].flip(0)  # a second image with a different channel order
    readout = torch.randn(3, 12, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.5
    model = ControlledLayer(readout).eval()
    exp = em.explain(model, acts, "cfcam", target=[2, 0], layer="layer", filter=filt, sigma=0.8)
    filters = {
        "released": released_filter_loops,
        "gaussian": lambda m: ndimage.gaussian_filter(m, 0.8, mode="mirror"),
        "none": lambda m: m,
    }
    for n, cls in enumerate((2, 0)):
        weights, labels = cfcam_reference(
            acts[n].double().numpy(), readout[cls].double().numpy(), filters[filt]
        )
        cam = np.maximum((weights[:, None, None] * acts[n].double().numpy()).sum(0), 0)
        assert np.allclose(exp.raw[n, 0].numpy(), cam, atol=1e-5)
        assert set(labels[STRONG if n == 0 else [11 - c for c in STRONG]].tolist()) == {IMPORTANT}
    # one image at a time gives the same (clusters of several images are batched)
    single = em.explain(model, acts[1:], "cfcam", target=[0], layer="layer", filter=filt, sigma=0.8)
    assert torch.allclose(single.raw[0], exp.raw[1], atol=1e-6)


def test_cfcam_on_random_layers_matches_the_reference():
    gen = torch.Generator().manual_seed(6)
    acts = torch.relu(torch.randn(2, 40, 5, 5, generator=gen))
    readout = torch.randn(3, 40, 5, 5, generator=gen) * 0.1
    model = ControlledLayer(readout).eval()
    exp = em.explain(model, acts, "cfcam", target=[1, 1], layer="layer", filter="released")
    for n in range(2):
        weights, labels = cfcam_reference(
            acts[n].double().numpy(), readout[1].double().numpy(), released_filter_loops
        )
        assert (labels >= 0).any()
        assert (labels == NOISE).any()
        cam = np.maximum((weights[:, None, None] * acts[n].double().numpy()).sum(0), 0)
        assert np.allclose(exp.raw[n, 0].numpy(), cam, atol=1e-5)


def test_degenerate_layers_give_finite_maps():
    readout = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(7))
    model = ControlledLayer(readout).eval()
    # constant activations: every norm ties, so every channel is important; flat map → zeros
    exp = em.explain(model, torch.full((1, 6, 3, 3), 2.0), "cfcam", target=0, layer="layer")
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))
    # all-zero activations
    exp = em.explain(model, torch.zeros(1, 6, 3, 3), "cfcam", target=0, layer="layer")
    assert torch.isfinite(exp.raw).all()
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))
    # two channels: the stronger is important, the other alone in R is DBSCAN noise (a single
    # point never reaches min_samples = 2): no cluster, only the important channel is weighted
    acts = torch.zeros(1, 2, 3, 3)
    acts[0, 0, 0, 0], acts[0, 1, 1, 1] = 1.0, 2.0
    groups = cluster_channels(acts, split_channels(acts))
    assert groups.labels.tolist() == [[NOISE, IMPORTANT]]
    assert groups.clusters.tolist() == [0]
    exp = em.explain(ControlledLayer(readout[:, :2]).eval(), acts, "cfcam", target=1, layer="layer")
    assert torch.allclose(exp.raw, acts[:, 1:])  # weight 1 on the important channel, 0 on noise
    # four tied strongest channels leave one channel in R: same outcome, and no NaN
    acts = torch.ones(1, 5, 3, 3)
    acts[0, 2] = 0.5
    groups = cluster_channels(acts, split_channels(acts))
    assert groups.labels[0].tolist() == [IMPORTANT, IMPORTANT, NOISE, IMPORTANT, IMPORTANT]
    exp = em.explain(ControlledLayer(readout[:, :5]).eval(), acts, "cfcam", target=0, layer="layer")
    assert torch.isfinite(exp.raw).all()
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))


def test_cfcam_in_3d_and_deterministic():
    model = seeded(SmallNet(dims=3, width=24))
    x = torch.randn(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(8))
    before = snapshot(model)
    a = em.explain(model, x, "cfcam", layer="features.3")
    b = em.explain(model, x, "cfcam", layer="features.3", filter="released")
    assert a.maps.shape == (2, 1, 5, 6, 7)
    assert a.raw.shape == (2, 1, 5, 6, 7)
    assert torch.isfinite(a.maps).all()
    assert torch.isfinite(b.maps).all()
    assert torch.equal(a.maps, em.explain(model, x, "cfcam", layer="features.3").maps)
    assert_unchanged(model, before)


def test_model_left_as_found():
    model = seeded(SmallNet(width=24, inplace=True))
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    for filt in ("gaussian", "released"):
        exp = em.explain(model, x, "cfcam", filter=filt, gradient_noise=0.1, noise_seed=1)
        assert torch.isfinite(exp.maps).all()
    assert_unchanged(model, before)
    assert model.training


def test_real_photos(lite0_photos):
    model, photos = lite0_photos
    exp = em.explain(model, photos, "cfcam", target=[282, 967])
    assert exp.layer == "_head_act"
    assert exp.raw.shape == (2, 1, 7, 7)
    # The evidence lies on the object: the cat's face / the cup fill the centre of these photos.
    centre = exp.maps[:, 0, 56:168, 56:168].mean((1, 2))
    border = torch.cat([exp.maps[:, 0, :28].flatten(1), exp.maps[:, 0, -28:].flatten(1)], 1).mean(1)
    assert bool((centre > border).all())
    released = em.explain(model, photos, "cfcam", target=[282, 967], filter="released")
    assert torch.isfinite(released.maps).all()


def test_softmax_temperature():
    scores = torch.tensor([[0.010, 0.020, -0.010, 0.040, 0.000]], dtype=torch.float64)
    labels = torch.tensor([[IMPORTANT, 0, 0, NOISE, IMPORTANT]])
    valid = [0, 1, 2, 4]
    s = scores[0, valid].numpy()
    for temperature, scale in ((1.0, 1.0), (0.01, 0.01), ("auto", s.std())):
        weights = softmax_weights(scores, labels, temperature)[0]
        expected = np.exp(s / scale) / np.exp(s / scale).sum()
        assert np.allclose(weights[valid].numpy(), expected)
        assert weights[3] == 0
    # equal scores: no spread to standardise by, uniform weights and no NaN
    flat = softmax_weights(torch.zeros(1, 5), labels, "auto")[0]
    assert torch.allclose(flat[valid], torch.full((4,), 0.25))


def test_auto_temperature_makes_the_map_depend_on_the_class(lite0_photos):
    model, photos = lite0_photos
    with torch.no_grad():
        ranked = model(photos).argsort(1, descending=True)
    top, fifth = ranked[:, 0], ranked[:, 4]

    def class_similarity(**options):
        a = em.explain(model, photos, "cfcam", target=top, **options).raw.flatten(1)
        b = em.explain(model, photos, "cfcam", target=fifth, **options).raw.flatten(1)
        return torch.nn.functional.cosine_similarity(a, b).min()

    # As released the softmax of tiny gradient means is nearly uniform: one map for every class.
    assert class_similarity() > 0.999
    assert class_similarity(temperature="auto") < 0.99


@pytest.fixture(scope="module")
def lite0_photos():
    from evidencemap import models

    model = models.load("efficientnet-lite0")
    return model, load_photos(model)


# --------------------------------------------------------------------------------------------
# The shared gradient-noise option.


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "cfcam"])
def test_gradient_noise_is_added_before_the_weights(method):
    readout = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(10))
    model = ControlledLayer(readout).eval()
    acts = torch.relu(torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(11)))
    sigma = 0.7
    noisy = em.explain(
        model, acts, method, target=[0, 2], layer="layer", gradient_noise=sigma, noise_seed=5
    )
    again = em.explain(
        model, acts, method, target=[0, 2], layer="layer", gradient_noise=sigma, noise_seed=5
    )
    assert torch.equal(noisy.raw, again.raw)
    # the same noise, added by hand to the exact gradients (the read-out rows)
    eps = torch.randn(acts.shape, generator=torch.Generator().manual_seed(5))
    grads = readout[[0, 2]] + sigma * eps
    cls = em.get_method(method)
    by_hand = cls(model, "layer").layer_map(acts, grads, None).clamp(min=0)
    assert torch.allclose(noisy.raw, by_hand, atol=1e-5)
    clean = em.explain(model, acts, method, target=[0, 2], layer="layer")
    assert torch.equal(
        clean.raw,
        em.explain(model, acts, method, target=[0, 2], layer="layer", gradient_noise=0.0).raw,
    )
    assert not torch.allclose(clean.raw, noisy.raw)
    assert noisy.options["gradient_noise"] == sigma


def test_gradient_noise_errors():
    model = seeded(SmallNet())
    with pytest.raises(ValueError, match="gradient_noise must be a finite number >= 0"):
        em.GradCAM(model, gradient_noise=-1.0)
    with pytest.raises(ValueError, match="gradient_noise must be a finite number >= 0"):
        em.GradCAM(model, gradient_noise=float("nan"))
    with pytest.raises(TypeError, match="gradient_noise must be a number"):
        em.GradCAM(model, gradient_noise="0.1")
    with pytest.raises(ValueError, match="needs a method that uses gradients"):
        em.EigenCAM(model, gradient_noise=0.1)


def test_cfcam_option_errors():
    model = seeded(SmallNet())
    with pytest.raises(ValueError, match="filter must be one of"):
        em.CFCAM(model, filter="bilateral")
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        em.CFCAM(model, sigma=0)
    with pytest.raises(TypeError, match="sigma_range must be a number"):
        em.CFCAM(model, sigma_range="x")
    with pytest.raises(ValueError, match=r"important_percentile must be in \[0, 100\]"):
        em.CFCAM(model, important_percentile=120)
    with pytest.raises(ValueError, match="temperature must be a positive number or 'auto'"):
        em.CFCAM(model, temperature=0)
    with pytest.raises(TypeError, match="temperature must be a positive number or 'auto'"):
        em.CFCAM(model, temperature="hot")
    with pytest.raises(ValueError, match="released_filter takes"):
        released_filter(torch.zeros(2, 5))
