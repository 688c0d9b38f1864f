"""Overlays, comparison grids, 3-D montages and PNG output (evidencemap.viz)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from skimage import data as skdata

from evidencemap.viz import (
    for_display,
    grid,
    montage,
    overlay,
    overlay_figure,
    peak_voxel,
    save_png,
    to_png_bytes,
)

PANEL_PX = 320  # one figure panel: 3.2 in at 100 dpi


def _grey(height: int = 60, width: int = 80) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def _is_red(pixels: np.ndarray) -> np.ndarray:
    r, g, b = (pixels[..., c].astype(int) for c in range(3))
    return (r > b + 40) & (r > g + 40)


def _is_blue(pixels: np.ndarray) -> np.ndarray:
    r, g, b = (pixels[..., c].astype(int) for c in range(3))
    return (b > r + 40) & (b > g + 40)


# --------------------------------------------------------------------------- overlay


def test_overlay_keeps_size_and_colours_hot_regions():
    photo = skdata.chelsea()  # (300, 451, 3)
    heat = torch.zeros(300, 451)
    heat[50:150, 200:350] = 1.0

    image = overlay(photo, heat, cmap="jet")

    assert image.mode == "RGB"
    assert image.size == (451, 300)
    on_grey = np.asarray(overlay(_grey(300, 451), heat, cmap="jet"))
    assert _is_red(on_grey[50:150, 200:350]).all()
    assert _is_blue(on_grey[200:, :150]).all()


def test_overlay_blends_with_alpha():
    heat = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    photo = np.asarray(Image.fromarray(skdata.coffee()).resize((80, 60)))
    jet = colormaps["jet"](heat)[..., :3] * 255

    np.testing.assert_array_equal(np.asarray(overlay(photo, heat, "jet", alpha=0.0)), photo)
    np.testing.assert_array_equal(
        np.asarray(overlay(photo, heat, "jet", alpha=1.0)), np.rint(jet).astype(np.uint8)
    )
    half = np.asarray(overlay(photo, heat, "jet", alpha=0.5)).astype(float)
    assert np.abs(half - (0.5 * photo + 0.5 * jet)).max() <= 0.5 + 1e-9


def test_overlay_uses_the_given_colormap():
    heat = torch.rand(1, 60, 80)  # (1, H, W) is accepted too
    grey = np.asarray(overlay(_grey(), heat, cmap="gray", alpha=1.0))
    expected = np.rint(colormaps["gray"](heat[0].numpy())[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(grey, expected)
    assert (grey[..., 0] == grey[..., 2]).all()


def test_overlay_resizes_a_smaller_heatmap():
    heat = torch.zeros(6, 8)
    heat[:3, 4:] = 1.0  # top-right quadrant

    pixels = np.asarray(overlay(_grey(300, 400), heat, cmap="jet"))

    assert pixels.shape == (300, 400, 3)
    assert _is_red(pixels[:120, 230:]).all()
    assert _is_blue(pixels[180:, :170]).all()


@pytest.mark.parametrize(
    ("heat", "kwargs", "message"),
    [
        (torch.ones(60, 80) * 2.0, {}, r"\[0, 1\]"),
        (-torch.ones(60, 80), {}, r"\[0, 1\]"),
        (torch.full((60, 80), float("nan")), {}, "NaN"),
        (torch.zeros(2, 60, 80), {}, "heatmap must be"),
        (torch.zeros(60), {}, "heatmap must be"),
        (torch.zeros(60, 80), {"cmap": "no-such-map"}, "colormap"),
        (torch.zeros(60, 80), {"alpha": 1.5}, "alpha"),
    ],
)
def test_overlay_rejects_bad_input(heat, kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlay(_grey(), heat, **kwargs)


def test_overlay_accepts_image_tensors():
    image = torch.zeros(3, 60, 80)
    image[0] = 1.0  # pure red, channel-first floats in [0, 1]
    pixels = np.asarray(overlay(image, torch.zeros(60, 80), alpha=0.0))
    assert (pixels == (255, 0, 0)).all()


# --------------------------------------------------------------------------- figures


def test_overlay_figure_draws_colour_bar():
    photo = skdata.chelsea()
    heat = torch.zeros(300, 451)  # no red anywhere in the overlay itself

    with_bar = overlay_figure(photo, heat, title="gradcam — tiger cat 0.39", cmap="jet")
    without = overlay_figure(
        photo, heat, title="gradcam — tiger cat 0.39", cmap="jet", colorbar=False
    )

    assert with_bar.mode == "RGB"
    assert with_bar.height == without.height
    assert with_bar.width - without.width == pytest.approx(90, abs=1)
    # the bar shows the top of jet (dark red); the picture without it has none
    assert _is_red(np.asarray(with_bar)).sum() > 100
    assert _is_red(np.asarray(without)).sum() == 0


def test_grid_width_grows_by_one_panel_per_map():
    photo = skdata.astronaut()
    maps = [(f"method {i} — tiger cat 0.{i}", torch.rand(512, 512)) for i in range(3)]

    widths = [grid(photo, maps[:n]).width for n in (1, 2, 3)]

    assert widths[1] - widths[0] == pytest.approx(PANEL_PX, abs=1)
    assert widths[2] - widths[1] == pytest.approx(PANEL_PX, abs=1)


def test_grid_extra_images_are_panels_too():
    photo = skdata.chelsea()
    maps = [("gradcam", torch.rand(300, 451))]
    explanation = np.asarray(Image.fromarray(photo).resize((224, 224)))

    two_maps = grid(photo, [*maps, ("fgvis", torch.rand(300, 451))], title="compare")
    map_and_image = grid(photo, maps, title="compare", extra_images=[("fgvis image", explanation)])

    assert map_and_image.size == two_maps.size
    only_photo = grid(photo, [])  # no map: no panel and no colour bar
    assert grid(photo, maps).width - only_photo.width == pytest.approx(PANEL_PX + 90, abs=1)


# --------------------------------------------------------------------------- volumes


def test_peak_voxel_finds_the_single_hot_voxel():
    heat = torch.zeros(8, 12, 16)
    heat[3, 7, 11] = 1.0
    heat[6, 2, 4] = 0.5
    assert peak_voxel(heat) == (3, 7, 11)
    assert peak_voxel(heat[None].numpy()) == (3, 7, 11)
    assert peak_voxel(torch.zeros(8, 12, 16)) == (4, 6, 8)  # flat: the centre


def _panel_box(pixels: np.ndarray, panel: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the coloured pixels in the ``panel``-th third of a montage.

    Overlay pixels are always coloured (jet has no grey), titles and background are not.
    """
    third = pixels.shape[1] // 3
    part = pixels[:, panel * third : (panel + 1) * third].astype(int)
    rows, columns = np.nonzero(part.max(axis=-1) - part.min(axis=-1) > 30)
    return rows.min(), columns.min(), np.ptp(rows) + 1, np.ptp(columns) + 1


def test_montage_slices_through_the_peak():
    size = 24
    heat = torch.zeros(size, size, size)
    heat[5, 17, 9] = 1.0
    heat[20, 2, 3] = 0.6  # a lesser bump on none of the peak's slices

    pixels = np.asarray(montage(torch.zeros(size, size, size), heat, "jet", colorbar=False))

    # a slice missing the single hot voxel would be all blue: each panel must show it
    red_columns = np.nonzero(_is_red(pixels).any(axis=0))[0]
    assert {int(3 * column / pixels.shape[1]) for column in red_columns} == {0, 1, 2}


@pytest.mark.parametrize(
    ("panel", "position"),
    [(0, (17, 9)), (1, (5, 9)), (2, (5, 17))],  # axial (h, w), coronal (d, w), sagittal (d, h)
)
def test_montage_draws_hot_voxel_where_it_is(panel, position):
    size = 24
    heat = torch.zeros(1, size, size, size)
    heat[0, 5, 17, 9] = 1.0
    volume = torch.randn(1, size, size, size)

    pixels = np.asarray(montage(volume, heat, "jet", colorbar=False))

    third = pixels.shape[1] // 3
    rows, columns = np.nonzero(_is_red(pixels[:, panel * third : (panel + 1) * third]))
    top, left, height, width = _panel_box(pixels, panel)
    assert (rows.mean() - top) / height == pytest.approx((position[0] + 0.5) / size, abs=0.02)
    assert (columns.mean() - left) / width == pytest.approx((position[1] + 0.5) / size, abs=0.02)


def test_montage_resizes_heatmap_and_honours_spacing():
    volume = torch.randn(10, 32, 32)
    low_res = torch.rand(5, 8, 8)

    plain = np.asarray(montage(volume, low_res, colorbar=False))
    scaled = np.asarray(montage(volume, low_res, spacing=(3.2, 1.0, 1.0), colorbar=False))

    # coronal panel: 10 × 32 voxels; with 3.2 mm slices it is 32 mm × 32 mm, i.e. square
    _, _, height, width = _panel_box(plain, 1)
    assert height / width == pytest.approx(10 / 32, abs=0.03)
    _, _, height, width = _panel_box(scaled, 1)
    assert height / width == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="spacing"):
        montage(volume, low_res, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="volume must be"):
        montage(torch.zeros(2, 10, 32, 32), low_res)


# --------------------------------------------------------------------------- flat maps


@pytest.mark.filterwarnings("error")
def test_flat_heatmaps_render_without_warnings():
    photo = skdata.coffee()
    flat = torch.zeros(400, 600)

    plain = np.asarray(overlay(photo, flat, "jet"))
    expected = 0.5 * photo + 0.5 * np.asarray(colormaps["jet"](0.0)[:3]) * 255
    assert np.abs(plain - expected).max() <= 0.5 + 1e-9

    assert overlay_figure(photo, flat).mode == "RGB"
    assert grid(photo, [("flat", flat), ("ones", torch.ones(400, 600))]).mode == "RGB"
    constant_volume = torch.full((6, 6, 6), 3.0)
    assert montage(constant_volume, torch.zeros(6, 6, 6)).mode == "RGB"


# --------------------------------------------------------------------------- output


def test_to_png_bytes_and_save_png(tmp_path):
    image = overlay(skdata.chelsea(), torch.rand(300, 451))

    encoded = to_png_bytes(image)
    path = save_png(image, tmp_path / "figures" / "cat.png")

    assert encoded.startswith(b"\x89PNG\r\n\x1a\n")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(encoded)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(image))
    with Image.open(io.BytesIO(to_png_bytes(np.zeros((4, 5, 3), np.uint8)))) as small:
        assert small.size == (5, 4)


def test_viz_never_touches_pyplot():
    code = (
        "import sys, torch\n"
        "from evidencemap import viz\n"
        "image = viz.grid(torch.rand(3, 32, 32), [('m', torch.rand(32, 32))])\n"
        "viz.montage(torch.rand(8, 8, 8), torch.rand(8, 8, 8))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0, result.stderr


def test_for_display_saturates_pixel_level_maps_only():
    maps = torch.zeros(2, 1, 20, 20)
    maps[:, 0] = torch.linspace(0, 0.5, 400).view(20, 20)
    maps[:, 0, 0, 0] = 1.0  # one spike carries the maximum
    pixel = for_display(maps, torch.randn(2, 3, 20, 20), percentile=90)
    q = maps[0].flatten().kthvalue(360).values  # the 90th percentile of 400 values
    assert torch.allclose(pixel, (maps / q).clamp(max=1))
    assert float(pixel[0, 0, 0, 0]) == 1.0
    assert float((pixel == 1).float().mean()) >= 0.1
    # maps upsampled from a layer, multi-layer raws and almost-empty maps are left as they are
    assert torch.equal(for_display(maps, torch.randn(2, 1, 5, 5)), maps)
    assert torch.equal(for_display(maps, [torch.randn(2, 1, 20, 20)]), maps)
    sparse = torch.zeros(1, 1, 20, 20)
    sparse[0, 0, 3, 4] = 1.0
    assert torch.equal(for_display(sparse, sparse), sparse)
    # maps that are their own raw values (FGVis' mask, absolute) are never stretched
    flat = torch.full((1, 1, 20, 20), 0.18)
    flat[0, 0, 5, 5] = 0.19
    assert torch.equal(for_display(flat, flat.clone()), flat)
    with pytest.raises(ValueError, match="percentile must be in"):
        for_display(maps, maps, percentile=0)
