"""Extremal perturbation: the mask generator and pyramid by hand, the area constraint, the game
on models that read one region, 2-D and 3-D, errors, and the real model on a photo."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import evidencemap as em
from evidencemap import runtime
from evidencemap.methods.extremal import (
    COLDNESS,
    ExtremalPerturbation,
    SmoothMaskGenerator,
    area_reference,
    perturb,
    perturbation_pyramid,
)
from evidencemap.methods.options import OptionError


class RegionMean(nn.Module):
    """Class ``k`` scores ``scale`` times the mean of the input over box ``k`` (all channels):
    the best mask of that box's area is the box. (The scale makes the reward's gradient as
    strong as a real network's logit against the area term, whose λ_0 = 300 is TorchRay's.)"""

    def __init__(self, boxes: list[tuple[slice, ...]], scale: float = 100.0) -> None:
        super().__init__()
        self.boxes = boxes
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [self.scale * x[(..., *box)].mean((1, *range(2, x.ndim))) for box in self.boxes], 1
        )


def by_hand_mask(
    params: torch.Tensor, size: tuple[int, int], step: int, sigma: float
) -> torch.Tensor:
    """The smooth max of the module docstring, element by element and cell by cell."""
    gen = SmoothMaskGenerator(size, step, sigma)
    margin = round(sigma)
    out = torch.zeros(size, dtype=torch.float64)
    rows, cols = gen.shape_in
    for u in range(size[0]):
        for v in range(size[1]):
            values = []
            cu, cv = (u + margin) // step, (v + margin) // step
            for i in range(cu - gen.padding, cu - gen.padding + 2 * gen.radius + 1):
                for j in range(cv - gen.padding, cv - gen.padding + 2 * gen.radius + 1):
                    inside = 0 <= i < rows and 0 <= j < cols
                    p = float(params[i, j]) if inside else 0.0
                    d = math.hypot(u + margin - (sigma + step * i), v + margin - (sigma + step * j))
                    values.append(math.exp(-2 * max(d / sigma - 0.5, 0) ** 2) * p)
            t = torch.tensor(values, dtype=torch.float64)
            out[u, v] = float((t * torch.softmax(COLDNESS * t, 0)).sum())
    return out.clamp(0, 1)


def test_the_smooth_max_masks_follow_the_formula_by_hand():
    size, step, sigma = (10, 13), 3, 3.0
    gen = SmoothMaskGenerator(size, step, sigma)
    assert gen.shape_in == (4, 5)
    params = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = gen.generate(params[None], gen.layout(torch.device("cpu"), torch.float64))[0]
    assert torch.allclose(got, by_hand_mask(params, size, step, sigma), atol=1e-12)
    ones = gen.generate(torch.ones(1, 4, 5), gen.layout(torch.device("cpu"), torch.float32))
    # every element is within σ/2 of a cell (kernel 1); the smooth max of the neighbours is a
    # softmax-weighted mean, a little under their max
    assert float(ones.min()) > 0.98
    assert float(ones.max()) <= 1


def test_the_area_reference_and_the_pyramid_by_hand():
    ref = area_reference(10, [0.3, 0.05])
    assert ref.tolist() == [[0.0] * 7 + [1.0] * 3, [0.0] * 9 + [1.0]]
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    pyr = perturbation_pyramid(x, "blur", 3, 4.0)
    assert pyr.shape == (2, 3, 3, 9, 8)
    assert torch.equal(pyr[:, -1], x)
    masks = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(4, 1, 1, 1).expand(4, 2, 9, 8)
    z = perturb(pyr, masks)
    assert torch.allclose(z[0], pyr[:, 0])  # 0: the most perturbed copy
    assert torch.allclose(z[1], pyr[:, 1])  # 0.5 of L − 1 = 2: the middle level
    assert torch.allclose(z[2], x)
    assert torch.allclose(z[3], (pyr[:, 0] + pyr[:, 1]) / 2)  # halfway between levels 0 and 1
    fade = perturbation_pyramid(x, "fade", 5, 1.0)
    assert torch.allclose(perturb(fade, masks)[3], 0.25 * x, atol=1e-6)


BOX_2D = (slice(4, 12), slice(16, 24))
BOX_3D = (slice(2, 6), slice(6, 10), slice(0, 4))
FAST = {"jitter": False, "perturbation": "fade", "max_iterations": 150}


@pytest.mark.parametrize("game", ["preserve", "delete", "dual"])
def test_the_mask_covers_the_region_the_model_reads_at_the_target_area(game):
    size = (24, 32)
    model = RegionMean([BOX_2D])
    x = torch.ones(1, 3, *size)
    area = 64 / (24 * 32)
    exp = em.explain(
        model, x, "extremal", target=0, areas=area, game=game, step=2, sigma=2.0, **FAST
    )
    mask = exp.maps[0, 0]
    inside = mask[BOX_2D]
    assert float(inside.mean()) > 0.8, float(inside.mean())
    assert float(inside.sum() / mask.sum()) > 0.7  # the box is 0.083 of the input
    # met to the smooth edges of a small box (a binary mask would be exact)
    assert abs(float(exp.extras["mask_area"][0, 0]) - area) < 0.3 * area
    assert exp.raw.shape == (1, 1, *size)
    # the image the game shows: kept where the mask is, faded elsewhere
    assert torch.allclose(exp.extras["explanation"], mask * x)
    assert torch.allclose(exp.extras["deleted"], (1 - mask) * x)


def test_several_areas_and_a_batch_each_row_its_own_run():
    boxes = [BOX_2D, (slice(14, 22), slice(2, 10))]
    model = RegionMean(boxes)
    x = torch.ones(2, 3, 24, 32)
    areas = [64 / 768, 128 / 768]
    opts = {"areas": areas, "step": 2, "sigma": 2.0, **FAST, "max_iterations": 80}
    exp = em.explain(model, x, "extremal", target=[0, 1], **opts)
    assert exp.raw.shape == (2, 2, 24, 32)
    assert torch.allclose(exp.extras["mask_area"], torch.tensor([areas, areas]), atol=0.02)
    for i, box in enumerate(boxes):
        assert float(exp.raw[i, 0][box].mean()) > 0.8  # the small mask: the box
        assert float(exp.raw[i, 1][box].mean()) > 0.8  # the larger one holds it
    assert torch.allclose(exp.maps, exp.raw.mean(1, keepdim=True))
    alone = em.explain(model, x[1:], "extremal", target=1, **opts)
    assert torch.allclose(alone.raw[0], exp.raw[1], atol=1e-5)


def test_a_volume_takes_the_same_path():
    model = RegionMean([BOX_3D])
    x = torch.ones(1, 1, 8, 12, 10)
    area = 64 / (8 * 12 * 10)
    exp = em.explain(model, x, "extremal", target=0, areas=area, step=2, sigma=2.0, **FAST)
    mask = exp.maps[0, 0]
    assert mask.shape == (8, 12, 10)
    assert float(mask[BOX_3D].mean()) > 0.7  # a 4³ box, smooth edges
    assert float(mask[BOX_3D].sum() / mask.sum()) > 0.5  # the box is 0.067 of the volume
    assert abs(float(exp.extras["mask_area"][0, 0]) - area) < 0.03  # smooth edges of a small box


def test_the_schedule_stretches_torchrays_800_steps():
    model = RegionMean([BOX_2D])
    assert ExtremalPerturbation(model, max_iterations=800).schedule() == (0.01, 1.0035)
    lr, growth = ExtremalPerturbation(model, max_iterations=200).schedule()
    assert lr == pytest.approx(0.04)
    assert growth**200 == pytest.approx(1.0035**800)
    assert ExtremalPerturbation(model, lr=0.2, area_growth=1.01).schedule() == (0.2, 1.01)


def test_progress_every_step_and_the_model_left_as_found():
    model = RegionMean([BOX_2D])
    model.train()
    seen: list[tuple[int, int]] = []
    with runtime.limits(progress=lambda done, total, desc: seen.append((done, total))):
        em.explain(model, torch.ones(1, 3, 24, 32), "extremal", max_iterations=5, step=4)
    assert seen == [(i, 5) for i in range(6)]
    assert model.training
    assert model.scale.requires_grad
    assert model.scale.grad is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"areas": 1.5}, "areas"),
        ({"areas": [0.1, 0.0]}, "areas"),
        ({"areas": []}, "areas"),
        ({"areas": [0.1] * 17}, "areas"),
        ({"areas": "0.1,x"}, "areas"),
        ({"game": "keep"}, "game"),
        ({"perturbation": "noise"}, "perturbation"),
        ({"levels": 1}, "levels"),
        ({"step": 0}, "step"),
        ({"sigma": -1.0}, "sigma"),
        ({"lr": 0.0}, "lr"),
        ({"area_growth": 0.5}, "area_growth"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_bad_options_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        em.build("extremal", RegionMean([BOX_2D]), **options)


def test_areas_from_the_command_line():
    assert em.build("extremal", RegionMean([BOX_2D]), areas="0.05,0.2").areas == (0.05, 0.2)
    assert em.build("extremal", RegionMean([BOX_2D]), areas=[0.3]).areas == (0.3,)


def test_the_service_cap_on_iterations():
    with pytest.raises(OptionError, match="max_iterations=1001 is over"):
        em.build("extremal_perturbation", RegionMean([BOX_2D]), caps={}, max_iterations=1001)


# ------------------------------------------------------------------------------ real photo


CAT_BOX = (slice(56, 168), slice(0, 112))


@pytest.mark.slow
def test_the_real_model_keeps_the_cat(lite0, photos):
    """chelsea's cat shrunk into a quarter of a 224² canvas of the data mean: a 10 % mask
    found in 40 steps (TorchRay's schedule stretched) lies on the cat."""
    canvas = torch.zeros(1, 3, 224, 224)
    small = torch.nn.functional.interpolate(photos[:1], size=(112, 112), mode="area")
    canvas[0, :, CAT_BOX[0], CAT_BOX[1]] = small[0]
    exp = em.explain(lite0.module, canvas, "extremal", max_iterations=40)
    assert int(exp.targets[0]) in range(281, 286)
    mask = exp.maps[0, 0]
    assert abs(float(mask.mean()) - 0.1) < 0.02
    share = float(mask[CAT_BOX].sum() / mask.sum())
    assert share > 0.45, share  # the box is 0.25 of the canvas


@pytest.mark.parametrize(("size", "step", "sigma"), [((10, 13), 3, 3.0), ((5, 7, 6), 2, 2.5)])
def test_the_smooth_max_backward_in_closed_form_is_the_gradient(size, step, sigma):
    gen = SmoothMaskGenerator(size, step, sigma)
    kernel = gen.layout(torch.device("cpu"), torch.float64)
    params = torch.rand(2, *gen.shape_in, dtype=torch.float64, requires_grad=True)
    # scaled into [0, 0.9]: away from the clamp at 1, whose kink gradcheck cannot take
    assert torch.autograd.gradcheck(
        lambda p: gen.generate(0.9 * p, kernel), (params,), fast_mode=True
    )


def test_the_masks_and_the_perturbation_equal_torchrays_formulation():
    """TorchRay's loop as re-implemented in benchmarks/extremal_speed.py (``F.unfold``, nearest
    upsampling of the ``K²`` channels, softmax pooling over them, the margin cropped; two
    gathers from the expanded pyramid) gives the same masks and perturbed images."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "extremal_speed.py"
    spec = importlib.util.spec_from_file_location("extremal_speed", path)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.randn(1, 3, 60, 75, generator=torch.Generator().manual_seed(0))
    theirs = bench.TorchRayLoop(nn.Identity(), x, 0, [0.1])
    gen = SmoothMaskGenerator((60, 75), 7, 21.0)
    params = torch.rand(2, 1, *gen.shape_in, generator=torch.Generator().manual_seed(1))
    want, _ = theirs.generate(params)
    got = gen.generate(params[:, 0], gen.layout(torch.device("cpu"), torch.float32))
    assert torch.allclose(got, want[:, 0], atol=1e-5)
    pyramid = perturbation_pyramid(x, "blur", 8, 20.0)
    assert torch.allclose(pyramid[0], theirs.pyramid, atol=1e-5)
    diff = perturb(pyramid, got[:1, None])[0] - theirs.apply(want[:1])
    assert float(diff.abs().max()) < 1e-4  # masks equal to 2e-6, times level gaps of ~10
