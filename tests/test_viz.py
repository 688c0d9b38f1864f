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


# --------------------------------------------------------------------------- figures for papers


def _tiny_explanations():
    import evidencemap as em
    from tiny import ConvGapFc, seeded

    model = seeded(ConvGapFc()).eval()
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    return em, model, x


def test_default_colour_map_is_perceptually_uniform():
    from evidencemap import viz

    assert viz.DEFAULT_CMAP == "inferno"
    heat = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels = np.asarray(overlay(_grey(8, 8), heat, alpha=1.0)).reshape(-1, 3).astype(float)
    lightness = pixels @ np.array([0.2126, 0.7152, 0.0722])  # luminance of the colours
    assert (np.diff(lightness) >= -0.5).all()  # rises with the value (jet's does not)
    jet = np.asarray(overlay(_grey(8, 8), heat, "jet", alpha=1.0)).reshape(-1, 3).astype(float)
    assert (np.diff(jet @ np.array([0.2126, 0.7152, 0.0722])) < -5).any()


def test_save_figure_writes_real_pdf_svg_and_png(tmp_path):
    from evidencemap.viz import overlay_plot, save_figure

    figure = overlay_plot(skdata.chelsea(), torch.rand(300, 451), title="gradcam — tabby 0.31")

    pdf = save_figure(figure, tmp_path / "fig.pdf")
    svg = save_figure(figure, tmp_path / "fig.svg")
    png = save_figure(figure, tmp_path / "fig", format="png", dpi=300)

    assert pdf.read_bytes().startswith(b"%PDF-")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml")
    assert "<svg" in text
    assert "tabby" in text
    assert png.name == "fig.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png) as picture:
        assert picture.width == round(figure.get_figwidth() * 300)
    with pytest.raises(ValueError, match="png, pdf, svg"):
        save_figure(figure, tmp_path / "fig.jpg")


def test_dpi_and_figsize_set_the_picture_size():
    photo = skdata.chelsea()
    heat = torch.rand(300, 451)

    base = overlay_figure(photo, heat)
    sharp = overlay_figure(photo, heat, dpi=200)
    sized = overlay_figure(photo, heat, figsize=(6.0, 3.0), dpi=100)

    assert sharp.width == pytest.approx(2 * base.width, abs=2)
    assert sized.size == (600, 300)
    with pytest.raises(ValueError, match="dpi"):
        overlay_figure(photo, heat, dpi=0)
    with pytest.raises(ValueError, match="figsize"):
        overlay_figure(photo, heat, figsize=(6.0,))


def test_bare_map_png_and_16_bit_tiff(tmp_path):
    from evidencemap.viz import save_map

    heat = torch.linspace(0, 1, 12 * 16).view(12, 16)

    png = save_map(heat, tmp_path / "map.png", cmap="gray")
    tiff = save_map(heat, tmp_path / "map.tif")
    signed = save_map(heat * 2 - 1, tmp_path / "signed.tiff", vmin=-1.0, vmax=1.0)
    on_photo = save_map(heat, tmp_path / "overlay.png", image=_grey(60, 80))

    with Image.open(png) as picture:
        assert picture.size == (16, 12)  # the map's own pixels: no title, bar or margin
        np.testing.assert_array_equal(
            np.asarray(picture),
            np.rint(colormaps["gray"](heat.numpy())[..., :3] * 255).astype(np.uint8),
        )
    with Image.open(tiff) as picture:
        values = np.asarray(picture)
    assert values.dtype == np.uint16
    np.testing.assert_array_equal(values, np.rint(heat.numpy().astype(np.float64) * 65535))
    with Image.open(signed) as picture:
        np.testing.assert_allclose(np.asarray(picture), values, atol=1)
    with Image.open(on_photo) as picture:
        assert picture.size == (80, 60)
    volume = save_map(torch.rand(3, 8, 8), tmp_path / "volume.tiff")
    with Image.open(volume) as picture:
        assert picture.n_frames == 3
    with pytest.raises(ValueError, match="png, tiff"):
        save_map(heat, tmp_path / "map.jpg")


def test_signed_scale_is_symmetric_and_diverging():
    signed = torch.zeros(20, 20)
    signed[:, :10] = -2.0
    signed[:, 10:] = 1.0

    pixels = np.asarray(overlay(_grey(20, 20), signed, "RdBu_r", alpha=1.0, vmin=-2, vmax=2))

    assert _is_blue(pixels[:, :10]).all()  # −2: the blue end
    assert _is_red(pixels[:, 10:]).all()  # +1: half way to red
    np.testing.assert_array_equal(
        pixels[0, 15], np.rint(np.asarray(colormaps["RdBu_r"](0.75)[:3]) * 255).astype(np.uint8)
    )
    with pytest.raises(ValueError, match="both vmin and vmax"):
        overlay(_grey(20, 20), signed, vmin=-2)


@pytest.mark.parametrize(
    ("method", "options", "signed"),
    [
        ("gradcam", {}, False),
        ("gradcam", {"relu": False}, True),
        ("gradcam", {"counterfactual": True}, True),
        ("saliency", {}, False),
        ("saliency", {"abs": False}, True),
        ("integrated_gradients", {"steps": 4}, True),
        ("integrated_gradients", {"steps": 4, "sign": "absolute"}, False),
        ("smoothgrad", {"wrap": "saliency", "abs": False, "samples": 2}, True),
    ],
)
def test_signed_maps_are_detected_and_drawn_on_a_symmetric_diverging_scale(method, options, signed):
    from evidencemap import viz

    em, model, x = _tiny_explanations()
    explanation = em.build(method, model, **options)(x)

    assert viz.is_signed(explanation) is signed
    figure = viz.figure(explanation, x[0])
    bar = next(ax for ax in figure.axes if ax.get_label() == "<colorbar>")
    low, high = bar.get_ylim()
    if signed:
        assert low == pytest.approx(-high)
        assert "lowers" in bar.get_ylabel()
        assert figure.axes[0].images[0] is not None
    else:
        assert (low, high) == (0.0, 1.0)
        assert bar.get_ylabel() == "evidence"
    forced = viz.figure(explanation, x[0], signed=not signed)
    forced_bar = next(ax for ax in forced.axes if ax.get_label() == "<colorbar>")
    assert bool(forced_bar.get_ylim()[0] < 0) is (not signed)


def test_signed_values_sum_channels_negate_counterfactuals_and_upsample():
    from evidencemap import viz

    em, model, x = _tiny_explanations()
    ig = em.explain(model, x, "integrated_gradients", steps=4)
    torch.testing.assert_close(viz.signed_values(ig), ig.raw.sum(1, keepdim=True))
    plain = em.build("gradcam", model, relu=False)(x)
    counter = em.build("gradcam", model, relu=False, counterfactual=True)(x)
    # Grad-CAM with the gradient negated is the negated map; shown negated back, they agree
    torch.testing.assert_close(viz.signed_values(counter), viz.signed_values(plain))
    m = viz.symmetric_scale(viz.signed_values(plain))
    torch.testing.assert_close(m, viz.signed_values(plain).abs().flatten(1).amax(1))
    assert float(viz.symmetric_scale(torch.zeros(1, 1, 4, 4))[0]) == 1.0


def test_figure_title_names_the_variant_and_outlines_the_crop():
    from evidencemap import viz
    from evidencemap.models.preprocess import ImagePreprocessor

    em, model, x = _tiny_explanations()
    counter = em.build("gradcam", model, counterfactual=True)(x)
    plain = em.explain(model, x, "gradcam")

    assert viz.figure(plain).axes[0].get_title().startswith("gradcam — class ")
    title = viz.figure(counter).axes[0].get_title()
    assert title.startswith("counterfactual gradcam — class ")

    pre = ImagePreprocessor(size=24, resize=32)
    photo = np.full((40, 60, 3), 128, np.uint8)
    small = torch.stack([pre(photo)] * 2)
    on_photo = em.explain(model, small, "gradcam")
    axes = viz.figure(on_photo, photo, model=pre).axes[0]
    (box,) = axes.patches  # the model's crop, dashed
    left, top, right, bottom = pre.crop_box(60, 40).region()
    assert box.get_x() == pytest.approx(left - 0.5)
    assert box.get_width() == pytest.approx(right - left)
    assert box.get_y() == pytest.approx(top - 0.5)
    assert box.get_height() == pytest.approx(bottom - top)
    assert box.get_linestyle() == "--"


def test_montage_has_orientation_letters_mm_scale_bar_and_slice_choice():
    from evidencemap.viz import montage_plot

    heat = torch.zeros(8, 10, 12)
    heat[2, 3, 4] = 1.0

    figure = montage_plot(
        torch.randn(8, 10, 12), heat, spacing=(3.0, 1.0, 1.0), orientation=True, colorbar=False
    )
    texts = [[t.get_text() for t in ax.texts] for ax in figure.axes]
    assert texts[0][:4] == ["A", "P", "R", "L"]
    assert texts[1][:4] == ["S", "I", "R", "L"]
    assert texts[2][:4] == ["S", "I", "A", "P"]
    # 30 % of 12 columns of 1 mm is 3.6 mm: the bar is 2 mm, one line of 2 columns
    assert texts[0][4] == "2 mm"
    (bar,) = figure.axes[0].lines
    assert np.ptp(bar.get_xdata()) == pytest.approx(2.0)
    assert [ax.get_title() for ax in figure.axes] == ["axial  d=2", "coronal  h=3", "sagittal  w=4"]

    chosen = montage_plot(torch.randn(8, 10, 12), heat, slices=(5, 6, 7), colorbar=False)
    assert [ax.get_title() for ax in chosen.axes] == ["axial  d=5", "coronal  h=6", "sagittal  w=7"]
    assert not any(ax.texts or ax.lines for ax in chosen.axes)  # no geometry given: none drawn
    with pytest.raises(ValueError, match="slices"):
        montage_plot(torch.randn(8, 10, 12), heat, slices=(8, 0, 0))


def test_explanation_of_a_volume_is_drawn_as_a_montage(tmp_path):
    import evidencemap as em
    from evidencemap import viz
    from tiny import ConvGapFc, seeded

    model = seeded(ConvGapFc(dims=3, channels=1)).eval()
    volume = torch.randn(1, 1, 8, 10, 12)
    explanation = em.explain(model, volume, "gradcam")

    figure = viz.figure(explanation, volume[0], spacing=(2.0, 1.0, 1.0), orientation=True)
    assert [ax.get_title().split()[0] for ax in figure.axes[:3]] == ["axial", "coronal", "sagittal"]
    axes = viz.plot(explanation, volume[0])
    assert len(axes) == 3
    path = viz.save(explanation, tmp_path / "map.tiff", bare=True)
    with Image.open(path) as picture:
        assert picture.n_frames == 8
    assert viz.save(explanation, tmp_path / "fig.svg").read_text().count("<svg") == 1
