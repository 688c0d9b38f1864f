"""The Explanation object itself: a compact repr, the variant's name, NumPy access and the
notebook helpers (which reach evidencemap.viz only when called)."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

import evidencemap as em
from evidencemap.explanation import Explanation
from tiny import ConvGapFc, seeded

SRC = Path(__file__).parents[1] / "src" / "evidencemap"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return seeded(ConvGapFc()).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(0))


def test_repr_is_short_and_names_what_matters(model, x):
    explanation = em.explain(model, x, "gradcam", target=[1, 3])

    text = repr(explanation)

    assert len(text) < 400, text
    assert str(explanation) == text
    assert "\n" not in text
    assert "tensor(" not in text  # no tensor dump
    for part in ("gradcam", "features.3", "(2, 1, 24, 32)", "targets=[1, 3]", "scores=["):
        assert part in text
    score = f"{float(explanation.scores[0]):.4g}"
    assert score in text


def test_repr_of_a_large_batch_stays_short(model):
    big = em.explain(model, torch.randn(64, 3, 24, 32), "integrated_gradients", steps=4)
    text = repr(big)
    assert len(text) < 600, text
    assert "…" in text  # 64 targets are not listed


def test_explanation_image_repr_is_compact():
    from evidencemap.explanation import ExplanationImage

    text = repr(ExplanationImage("explanation", torch.rand(3, 224, 224), 0.93, 282))
    assert text == "ExplanationImage(kind='explanation', image=(3, 224, 224), score=0.93, top1=282)"


@pytest.mark.parametrize(
    ("method", "options", "label"),
    [
        ("gradcam", {}, "gradcam"),
        ("gradcam", {"counterfactual": True}, "counterfactual gradcam"),
        ("gradcam", {"relu": False}, "gradcam (relu=False)"),
        ("saliency", {"abs": False}, "saliency (abs=False)"),
        ("integrated_gradients", {"sign": "absolute", "steps": 4}, None),
        ("smoothgrad", {"wrap": "saliency", "samples": 2}, "smoothgrad of saliency"),
    ],
)
def test_label_names_the_variant(model, x, method, options, label):
    explanation = em.build(method, model, **options)(x)
    expected = label or "integrated_gradients (sign='absolute')"
    assert explanation.label == expected
    assert expected in repr(explanation)


def test_numpy_gives_float32_arrays_of_the_maps_and_raw(model, x):
    explanation = em.explain(model, x, "gradcam")

    maps = explanation.numpy()
    raw = explanation.numpy(raw=True)

    assert isinstance(maps, np.ndarray)
    assert maps.dtype == np.float32
    assert maps.shape == (2, 1, 24, 32)
    np.testing.assert_array_equal(maps, explanation.maps.numpy())
    assert isinstance(raw, np.ndarray)
    np.testing.assert_array_equal(raw, explanation.raw.numpy())
    several = em.explain(model, x, "gradcam", layer=["features.1", "features.3"])
    assert isinstance(several.numpy(raw=True), list)


def test_repr_png_is_a_png_of_the_batch(model, x):
    explanation = em.explain(model, x, "gradcam")

    png = explanation._repr_png_()

    assert png is not None
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.width > picture.height  # two maps side by side


def test_plot_draws_on_given_axes_and_makes_its_own(model, x):
    explanation = em.explain(model, x, "gradcam")
    figure = Figure()
    ax = figure.add_subplot()

    drawn = explanation.plot(x[1], ax=ax, index=1)

    assert drawn is ax
    assert ax.images
    assert "gradcam" in ax.get_title()
    own = explanation.plot()
    assert isinstance(own, Axes)
    assert isinstance(own.figure, Figure)


def test_show_uses_the_image_viewer_outside_notebooks(model, x, monkeypatch):
    shown: list[Image.Image] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, *a, **k: shown.append(self))
    em.explain(model, x, "gradcam").show()
    assert len(shown) == 1
    assert shown[0].mode == "RGB"


def test_core_never_imports_viz_or_matplotlib():
    tree = ast.parse((SRC / "explanation.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("viz" in name or "matplotlib" in name for name in imported), imported
    code = (
        "import sys, torch, evidencemap as em\n"
        "from tiny import ConvGapFc\n"
        "e = em.explain(ConvGapFc().eval(), torch.randn(1, 3, 8, 8), 'gradcam')\n"
        "repr(e); e.numpy()\n"
        "assert 'evidencemap.viz' not in sys.modules, 'viz was imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr


def test_to_keeps_every_field(model, x):
    explanation = em.explain(model, x, "gradcam")
    moved = explanation.to("cpu")
    assert isinstance(moved, Explanation)
    assert repr(moved) == repr(explanation)
