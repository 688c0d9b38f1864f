"""The FGVis paper table's pieces: the RISE ``gkern`` substrate, region-wise deletion, the random
map baseline, and the table script's core on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

import evidencemap as em
from evidencemap import metrics as M
from evidencemap.filters import rise_kernel1d, separable_filter
from metrics_helpers import BoxModel, sigmoid
from tiny import ConvGapFc, assert_unchanged, seeded, snapshot

# ---------------------------------------------------------------- the RISE gkern substrate


def scipy_gkern(klen: int, nsig: float, dims: int = 2) -> np.ndarray:
    """The RISE code's construction: a Dirac of ``klen`` per axis smoothed by scipy's
    ``gaussian_filter(·, nsig)`` (default ``mode="reflect"``, ``truncate=4``)."""
    inp = np.zeros((klen,) * dims)
    inp[(klen // 2,) * dims] = 1
    return ndimage.gaussian_filter(inp, nsig)


@pytest.mark.parametrize(("klen", "nsig"), [(11, 5.0), (7, 1.5), (3, 2.0), (1, 5.0), (21, 3.0)])
def test_rise_kernel_equals_the_rise_construction(klen, nsig):
    k = rise_kernel1d(klen, nsig, dtype=torch.float64)
    assert np.abs(np.outer(k.numpy(), k.numpy()) - scipy_gkern(klen, nsig)).max() < 1e-7
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-12)  # the reflected tails keep the mass
    assert torch.allclose(k, k.flip(0), rtol=0, atol=1e-15)
    cube = np.einsum("i,j,k->ijk", *(k.numpy(),) * 3)
    assert np.abs(cube - scipy_gkern(klen, nsig, dims=3)).max() < 1e-7
    # float32 as RISE casts it
    k32 = rise_kernel1d(klen, nsig)
    assert k32.dtype == torch.float32
    ref = scipy_gkern(klen, nsig).astype("float32")
    assert np.abs(np.outer(k32.numpy(), k32.numpy()) - ref).max() < 1e-7


def test_rise_kernel_is_much_flatter_than_the_truncated_blur():
    k = rise_kernel1d(11, 5.0, dtype=torch.float64)
    truncated = torch.exp(-(torch.arange(-5, 6, dtype=torch.float64) ** 2) / 50)
    truncated /= truncated.sum()
    assert float(k[0] / k[5]) == pytest.approx(0.9359, abs=1e-4)  # nearly a box filter
    assert float(truncated[0] / truncated[5]) == pytest.approx(math.exp(-0.5), abs=1e-12)
    with pytest.raises(ValueError, match="odd int"):
        rise_kernel1d(10, 5.0)
    with pytest.raises(ValueError, match="sigma"):
        rise_kernel1d(11, 0.0)


def test_rise_blur_is_the_depthwise_conv_of_the_rise_code_in_2d_and_3d():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 17, generator=gen, dtype=torch.float64)
    kern = torch.from_numpy(scipy_gkern(11, 5.0))
    weight = torch.zeros(3, 3, 11, 11, dtype=torch.float64)
    for c in range(3):
        weight[c, c] = kern  # RISE's kern[c, c] = k, zeros elsewhere
    want = F.conv2d(x, weight, padding=5)
    assert torch.allclose(M.rise_blur(x), want, atol=1e-12)
    vol = torch.rand(1, 2, 9, 12, 13, generator=gen, dtype=torch.float64)
    kern3 = torch.from_numpy(scipy_gkern(11, 5.0, dims=3))
    want3 = F.conv3d(vol.view(2, 1, 9, 12, 13), kern3[None, None], padding=5).view_as(vol)
    assert torch.allclose(M.rise_blur(vol), want3, atol=1e-12)
    assert M.rise_blur(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="kernel must be 1-D of odd length"):
        separable_filter(x, torch.ones(4))


def test_rise_gkern_is_a_named_substrate():
    model = BoxModel((8, 8), (slice(2, 5), slice(2, 5)))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    insertion = M.Insertion(model, substrate="rise_gkern")
    assert torch.equal(insertion.substrate_of(x), M.rise_blur(x))
    assert not torch.allclose(insertion.substrate_of(x), M.gaussian_blur(x))
    assert "rise_gkern" in M.describe_metric("insertion").options["substrate"].choices
    assert M.Deletion(model, substrate="rise_gkern").substrate == "rise_gkern"
    with pytest.raises(ValueError, match="'rise_gkern'"):
        M.Deletion(model, substrate="gkern")


def test_rise_gkern_insertion_differs_from_the_blur_on_a_real_photo(lite0, photos):
    chelsea = photos[:1]
    maps = em.GradCAM(lite0)(chelsea).maps
    blur = M.Insertion(lite0, steps=16)(chelsea, maps).auc
    gkern = M.Insertion(lite0, steps=16, substrate="rise_gkern")(chelsea, maps).auc
    # the flatter kernel removes more of the texture: the start image scores lower
    assert abs(float(gkern[0]) - float(blur[0])) > 0.005


# ---------------------------------------------------------------- region-wise deletion


def test_patch_grid_raster_ids_and_uneven_edges():
    ids, count = M.patch_grid((5, 7), 4)
    assert count == 4
    grid = ids.view(5, 7)
    assert grid[:4, :4].eq(0).all()
    assert grid[:4, 4:].eq(1).all()
    assert grid[4:, :4].eq(2).all()
    assert grid[4:, 4:].eq(3).all()
    ids3, count3 = M.patch_grid((4, 4, 4), 2)
    assert count3 == 8
    assert ids3.view(4, 4, 4)[2:, 0:2, 2:].eq(5).all()  # (1, 0, 1) → 1·4 + 0·2 + 1


def test_region_deletion_by_hand_in_2d():
    # the model reads the top half (patches 0 and 1 of the 2 × 2 grid of 4 × 4 patches)
    model = BoxModel((8, 8), (slice(0, 4), slice(0, 8)))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:, :, :4, :] = 1.0
    maps = torch.zeros(2, 1, 8, 8)
    maps[:, :, :4, :4] = 0.0
    maps[:, :, 0, 0] = 1.0  # patch 0: one bright pixel, mean 1/16 (pixel deletion takes it first)
    maps[:, :, :4, 4:] = 0.5  # patch 1: mean 0.5
    maps[:, :, 4:, :4] = 0.2  # patch 2
    maps[:, :, 4:, 4:] = 0.01  # patch 3: mean 0.01 < 1/16
    run = M.RegionDeletion(model, patch=4)(x, maps, 0)
    # order 1, 2, 0, 3: the box mean goes 1 → 0.5 → 0.5 → 0 → 0
    want = [sigmoid(2.0), sigmoid(0.0), sigmoid(0.0), sigmoid(-2.0), sigmoid(-2.0)]
    for i in range(2):
        assert run.curves[i].tolist() == pytest.approx(want, abs=1e-6)
    assert run.fractions.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    area = 0.25 * ((want[0] + want[1]) / 2 + want[1] + (want[2] + want[3]) / 2 + want[3])
    assert run.auc.tolist() == pytest.approx([area, area], abs=1e-6)
    # two patches per step (steps=2): 1 and 2, then 0 and 3
    two = M.RegionDeletion(model, patch=4, steps=2)(x, maps, 0)
    assert two.curves[0].tolist() == pytest.approx([want[0], want[2], want[4]], abs=1e-6)
    assert torch.equal(M.RegionDeletion(model, patch=4, step=2)(x, maps, 0).curves, two.curves)
    # the substrate of deletion: 0.5 everywhere leaves the box mean at 0.75 after patch 1
    half = M.RegionDeletion(model, patch=4, substrate=0.5)(x, maps, 0)
    assert float(half.curves[0, 1]) == pytest.approx(sigmoid(4 * (0.75 - 0.5)), abs=1e-6)


def test_region_deletion_by_hand_on_volumes_and_uneven_patches():
    model = BoxModel((4, 4, 4), (slice(0, 2), slice(0, 2), slice(0, 2)))  # cube 0 of 8
    x = torch.rand(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    x[:, :, :2, :2, :2] = 1.0
    ids, _ = M.patch_grid((4, 4, 4), 2)
    rank_of_cube = torch.tensor([2, 0, 1, 3, 4, 5, 6, 7])  # cube 0 goes third
    maps = (8 - rank_of_cube[ids]).float().view(1, 1, 4, 4, 4)
    run = M.RegionDeletion(model, patch=2)(x, maps, 0)
    want = [sigmoid(2.0)] * 3 + [sigmoid(-2.0)] * 6
    assert run.curves[0].tolist() == pytest.approx(want, abs=1e-6)
    # uneven patches are ranked by their mean, not their sum: the 1 × 3 corner patch (mean 0.9)
    # goes before the 4 × 4 one (mean 0.5, sum 8)
    flat = BoxModel((5, 7), (slice(4, 5), slice(4, 7)))
    img = torch.ones(1, 1, 5, 7)
    m = torch.zeros(1, 1, 5, 7)
    m[:, :, :4, :4] = 0.5
    m[:, :, 4:, 4:] = 0.9
    curve = M.RegionDeletion(flat, patch=4)(img, m, 0).curves[0]
    assert float(curve[1]) == pytest.approx(sigmoid(-2.0), abs=1e-6)


def test_region_deletion_is_registered_and_checks_its_options():
    assert "region_deletion" in M.metric_names()
    names = M.metric_names()
    assert names.index("region_deletion") == names.index("insertion") + 1
    spec = M.describe_metric("region_deletion")
    assert spec.columns == {"region_deletion_auc": ("Region deletion AUC", False)}
    assert spec.quick["steps"] == 16
    model = seeded(ConvGapFc())
    with pytest.raises(ValueError, match="patch"):
        M.RegionDeletion(model, patch=0)
    with pytest.raises(ValueError, match="substrate"):
        M.RegionDeletion(model, substrate="nothing")


def test_region_deletion_through_the_evaluation(tmp_path):
    from evidencemap.evaluation import evaluate

    model = seeded(ConvGapFc())
    before = snapshot(model)
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    results = evaluate(
        model,
        [("a", x)],
        methods=["gradcam", "random"],
        metrics=["region_deletion"],
        metric_options={"region_deletion": {"patch": 4}},
        progress=False,
    )
    rows = {r["method"]: r for r in results.records}
    assert set(rows) == {"gradcam", "random"}
    assert all(0 <= r["region_deletion_auc"] <= 1 for r in rows.values())
    assert_unchanged(model, before)


# ---------------------------------------------------------------- the random map


def test_random_map_is_uniform_seeded_and_ignores_model_and_input():
    model = seeded(ConvGapFc())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exp = em.explain(model, x, "random", seed=3)
    assert exp.maps.shape == (3, 1, 32, 32)
    assert exp.method == "random"
    assert torch.equal(exp.maps, exp.raw)
    values = exp.maps.flatten().double().numpy()
    assert stats.kstest(values, "uniform").pvalue > 0.01
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.05  # neighbours independent
    # the same seed and batch shape: the same maps, whatever the input, target or model
    again = em.explain(seeded(ConvGapFc(), seed=5), -x, "random", seed=3, target=[1, 2, 0])
    assert torch.equal(again.maps, exp.maps)
    assert not torch.equal(em.explain(model, x, "random", seed=4).maps, exp.maps)
    assert not torch.equal(exp.maps[0], exp.maps[1])
    # the scores are the target's, as for any method
    assert torch.allclose(exp.scores, model(x).gather(1, exp.targets[:, None])[:, 0], atol=1e-6)
    assert exp.options["seed"] == 3
    vol = em.explain(seeded(ConvGapFc(dims=3)), torch.randn(1, 3, 4, 6, 6), "random")
    assert vol.maps.shape == (1, 1, 4, 6, 6)
    assert "sanity baseline" in em.describe("random").summary
    assert em.describe("random-map").cls is em.describe("random").cls


@pytest.mark.slow
def test_random_map_beats_gradcam_on_pixel_deletion_but_not_on_insertion_or_road(lite0, photos):
    """The issue's finding on real photos (the paper table's protocol on Lite0): scattered
    removed pixels break the texture, which pixel deletion rewards; insertion and ROAD do not."""
    cam = em.explain(lite0, photos, "gradcam").maps
    rand = em.explain(lite0, photos, "random").maps
    deletion = M.Deletion(lite0, steps=28)
    insertion = M.Insertion(lite0, steps=14, substrate="rise_gkern")
    road = M.ROAD(lite0, percentiles=[50])
    assert (deletion(photos, rand).auc < deletion(photos, cam).auc).all()
    assert (insertion(photos, rand).auc < insertion(photos, cam).auc).all()
    assert (road(photos, rand).combined < road(photos, cam).combined).all()


# ---------------------------------------------------------------- the table script


def load_table_script():
    path = Path(__file__).parents[1] / "benchmarks" / "fgvis_paper_table.py"
    spec = importlib.util.spec_from_file_location("fgvis_paper_table", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_table_script_scores_caches_and_tabulates_on_a_tiny_model(tmp_path):
    table = load_table_script()
    model = seeded(ConvGapFc())
    images = [
        ("a", torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))),
        ("b", torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))),
    ]
    cache_path = tmp_path / "cache.json"
    settings = table.Settings.make(quick=True)
    cache = table.Cache(cache_path)
    done = table.score_model(cache, "tiny", model, images, ["gradcam", "random"], settings)
    assert done == 4
    rows = json.loads(cache_path.read_text())["tiny"]
    assert set(rows) == {"a", "b"}
    entry = rows["a"]["gradcam"]
    assert set(entry) >= {"deletion", "insertion", "road", "region_deletion", "seconds"}
    assert 0 <= entry["deletion"] <= 1
    # a second run computes nothing; --force recomputes
    again = table.Cache(cache_path)
    assert table.score_model(again, "tiny", model, images, ["gradcam", "random"], settings) == 0
    assert table.score_model(again, "tiny", model, images, ["gradcam"], settings, force=True) == 2
    summary = table.summarise(again.data["tiny"], ["gradcam", "random"])
    assert summary["gradcam"]["deletion"]["n"] == 2
    text = table.markdown_table("tiny", summary, paper=None)
    assert "| gradcam |" in text
    assert "| **random** |" in text


def test_table_script_paper_protocol_settings_rows_and_insertion_columns():
    table = load_table_script()
    settings = table.Settings.make(model="lite0", protocol="paper")
    # RISE's curves: 224 steps of 224 pixels on a 224 × 224 image
    assert (settings.deletion_steps, settings.insertion_steps) == (224, 224)
    assert settings.options_for("rise") == ("rise", {"masks": 4000})
    assert settings.options_for("lime") == ("lime", {"samples": 1000})
    assert settings.options_for("fgvis_delete") == (
        "fgvis", {"max_iterations": 300, "game": "delete"}
    )  # fmt: skip
    # the key differs from the reduced table's, so the two caches never mix
    assert settings.key("gradcam") != table.Settings.make(model="lite0").key("gradcam")
    rows, _ = table.table_rows(seeded(ConvGapFc()), None, "paper")
    assert rows == list(table.PAPER_ROWS)
    with pytest.raises(ValueError, match="lite0 only"):
        table.Settings.make(model="vgg16", protocol="paper")
    entry = {"mean": 0.1, "std": 0.0, "n": 1}
    summary = {"rise": dict.fromkeys((*table.METRICS, "seconds"), entry)}
    text = table.markdown_table("t", summary, table.PAPER, table.PAPER_INSERTION)
    assert "paper insertion ResNet-50" in text.splitlines()[2]
    assert "| 0.7267 | 0.7226 |" in text
