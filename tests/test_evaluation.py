"""The evaluation runner (``evidencemap.evaluation``) and the ``evaluate`` command."""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import evidencemap
from evidencemap import GradCAM
from evidencemap.cli import evaluate as evaluate_command
from evidencemap.cli import main
from evidencemap.cli.common import CLIError
from evidencemap.evaluation import (
    COLUMNS,
    METRIC_NAMES,
    QUICK_METHOD_OPTIONS,
    EvaluationResults,
    evaluate,
    to_input_boxes,
)
from evidencemap.methods import METHODS
from evidencemap.methods.options import Option
from evidencemap.methods.registry import applicable_methods
from evidencemap.metrics import (
    Metric,
    MetricContext,
    MetricRecord,
    describe_metric,
    register_metric,
    unregister_metric,
)
from evidencemap.models.preprocess import CropBox
from tiny import ConvGapFc, assert_unchanged, seeded, snapshot

FILES = (
    "summary.md",
    "summary.csv",
    "per_image.csv",
    "per_image.json",
    "deletion_insertion.png",
    "road.png",
)
QUICK_CURVE_POINTS = 17  # quick mode: 16 steps, plus the start image
QUICK_ROAD_LEVELS = [25.0, 75.0]
TIGER_CAT, ESPRESSO = 282, 967


def _images(
    shape: tuple[int, ...], count: int = 2, seed: int = 1
) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"img{i}", torch.randn(shape, generator=gen)) for i in range(count)]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _no_nan(value: object) -> None:
    """No NaN or infinity anywhere in a parsed JSON value."""
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _no_nan(v)
    elif isinstance(value, list):
        for v in value:
            _no_nan(v)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[EvaluationResults, Path, torch.nn.Module, dict]:
    """Three methods × every metric on two 16 × 16 images of a tiny 2-D model, quick mode."""
    torch.manual_seed(0)
    model = seeded(ConvGapFc(dims=2))
    before = snapshot(model)
    out = tmp_path_factory.mktemp("tiny")
    # class 0 in img0 and class 1 in img1 (input pixels), so one pointing class is not top-1
    boxes = {"img0": [[0, 0, 8, 8, 0]], "img1": [[4, 4, 12, 12, 1], [0, 0, 4, 4, 1]]}
    results = evaluate(
        model,
        _images((3, 16, 16)),
        ["gradcam", "GradCAM++", "scorecam"],
        list(METRIC_NAMES),
        boxes,
        quick=True,
        progress=False,
        out_dir=out,
    )
    return results, out, model, before


def test_runner_writes_every_table_plot_and_number(tiny_run):
    results, out, _, _ = tiny_run
    methods = ["gradcam", "gradcam++", "scorecam"]  # aliases become canonical names
    assert results.methods == methods
    assert results.columns == list(COLUMNS)  # every metric asked for: every column
    assert sorted(p.name for p in results.files) == sorted(FILES)
    for name in FILES:
        assert (out / name).stat().st_size > 0

    summary = _read_csv(out / "summary.csv")
    assert len(summary) == len(methods) * len(COLUMNS)
    assert {(r["method"], r["metric"]) for r in summary} == {
        (m, c) for m in methods for c in COLUMNS
    }
    for row in summary:
        assert row["higher_is_better"] == str(COLUMNS[row["metric"]][1])
        assert math.isfinite(float(row["mean"]))  # every metric gave a number
        assert int(row["n"]) >= 1

    per_image = _read_csv(out / "per_image.csv")
    assert [(r["image"], r["method"]) for r in per_image] == [
        (i, m) for m in methods for i in ("img0", "img1")
    ]
    assert all(r[c] != "" for r in per_image for c in COLUMNS)

    table = (out / "summary.md").read_text(encoding="utf-8")
    for method in methods:
        assert f"| {method} |" in table
    for title, higher in COLUMNS.values():
        assert f"{title} {'↑' if higher else '↓'}" in table
    assert "quick=True" in table
    assert "'top_k': 32" in table

    stored = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
    _no_nan(stored)
    assert stored["directions"] == {c: COLUMNS[c][1] for c in COLUMNS}
    # the directions are the metric classes' own
    from evidencemap.metrics import METRICS

    described = {c: d for cls in METRICS.values() for c, d in cls.directions.items()}
    assert stored["directions"] == described
    for method in methods:
        curves = stored["curves"][method]
        for key in ("deletion", "insertion"):
            assert np.asarray(curves[key]).shape == (2, QUICK_CURVE_POINTS)
            assert np.asarray(curves[f"{key}_fractions"]).shape == (2, QUICK_CURVE_POINTS)
        assert curves["road_percentiles"] == QUICK_ROAD_LEVELS
        assert np.asarray(curves["road_morf"]).shape == (2, len(QUICK_ROAD_LEVELS))

    for name in ("deletion_insertion.png", "road.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert im.width > 500
            assert im.height > 200


def test_runner_numbers_agree_with_their_definitions(tiny_run):
    results, _, _, _ = tiny_run
    summary = results.summary()
    for method in results.methods:
        rows = [r for r in results.records if r["method"] == method]
        for col in ("deletion_auc", "adcc", "road_combined"):
            values = [r[col] for r in rows]
            mean, std, n = summary[method][col]
            assert n == 2
            assert mean == pytest.approx(sum(values) / 2)
            assert std == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        for r in rows:
            # ROAD's summary is (LeRF − MoRF) / 2 averaged over levels
            assert r["road_combined"] == pytest.approx((r["road_lerf"] - r["road_morf"]) / 2)
            assert 0 <= r["deletion_auc"] <= 1
            assert 0 <= r["insertion_auc"] <= 1
            assert 0 <= r["energy_pointing_game"] <= 1
        # the pointing game: per-class hit rate, averaged over the classes 0 and 1
        hits = {
            c: [p["hit"] for p in results.pointing if p["method"] == method and p["class"] == c]
            for c in (0, 1)
        }
        expected = sum(sum(h) / len(h) for h in hits.values()) / 2
        assert summary[method]["pointing_game"][0] == pytest.approx(expected)
        curves = results.curves[method]["deletion"]
        fractions = results.curves[method]["deletion_fractions"]
        for curve, xs, r in zip(curves, fractions, rows, strict=True):
            assert xs[0] == 0
            assert xs[-1] == 1
            assert np.trapezoid(curve, xs) == pytest.approx(r["deletion_auc"], abs=1e-6)


def test_table_bolds_every_method_that_ties_for_best():
    records = [
        {"image": "a", "method": "m1", "deletion_auc": 0.2},
        {"image": "a", "method": "m2", "deletion_auc": 0.2 + 1e-9},  # prints as 0.200 too
        {"image": "a", "method": "m3", "deletion_auc": 0.5},
        {"image": "a", "method": "m4", "deletion_auc": math.nan},  # undefined: a dash
    ]
    results = EvaluationResults(records, [], {}, {}, ["m1", "m2", "m3", "m4"], ["deletion_auc"])
    rows = results.to_markdown().splitlines()
    assert rows[0] == "| method | Deletion AUC ↓ |"
    assert rows[2:] == ["| m1 | **0.200** |", "| m2 | **0.200** |", "| m3 | 0.500 |", "| m4 | — |"]


def test_runner_leaves_the_model_as_found(tiny_run):
    _, _, model, before = tiny_run
    assert_unchanged(model, before)
    assert not model.training


def test_quick_options_reach_only_the_methods_that_take_them(tiny_run):
    results, _, _, _ = tiny_run
    options = results.settings["method_options"]
    assert options["scorecam"] == QUICK_METHOD_OPTIONS["scorecam"]
    assert options["gradcam"] == {}
    assert options["gradcam++"] == {}


def test_method_options_override_quick_mode_and_are_checked():
    model = seeded(ConvGapFc(dims=2))
    images = _images((3, 8, 8), count=1)
    results = evaluate(
        model,
        images,
        ["scorecam"],
        ["average_drop"],
        quick=True,
        progress=False,
        method_options={"Score-CAM": {"top_k": 2}},
    )
    assert results.settings["method_options"]["scorecam"] == {"top_k": 2}
    with pytest.raises(ValueError, match="'gradcam'.*not among the methods"):
        evaluate(
            model,
            images,
            ["scorecam"],
            ["average_drop"],
            progress=False,
            method_options={"gradcam": {"relu": False}},
        )
    with pytest.raises(ValueError, match="takes no option 'top_kk'"):
        evaluate(
            model,
            images,
            ["scorecam"],
            ["average_drop"],
            progress=False,
            method_options={"scorecam": {"top_kk": 2}},
        )


def test_runner_on_volumes_gives_finite_numbers(tmp_path):
    model = seeded(ConvGapFc(dims=3))
    results = evaluate(
        model,
        _images((3, 4, 6, 6)),
        ["gradcam", "layercam"],
        ["deletion", "insertion", "average_drop", "road"],
        quick=True,
        progress=False,
        out_dir=tmp_path,
    )
    positions = 4 * 6 * 6
    points = math.ceil(positions / math.ceil(positions / 16)) + 1
    for method in results.methods:
        assert np.asarray(results.curves[method]["insertion"]).shape == (2, points)
    for record in results.records:
        assert all(math.isfinite(record[c]) for c in results.columns)
    assert (tmp_path / "road.png").is_file()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"methods": ["gradcam", "nosuch", "other"]}, ValueError, "'nosuch', 'other'"),
        ({"metrics": ["deletion", "accuracy"]}, ValueError, "'accuracy'"),
        ({"metrics": ["pointing_game"]}, ValueError, "need boxes"),
        (
            {"metrics": ["deletion"], "boxes": {"elsewhere": [[0, 0, 1, 1, 0]]}},
            ValueError,
            "elsewhere",
        ),
        (
            {"metrics": ["pointing_game"], "boxes": {"img0": [[0, 0, 1, 1]]}},
            ValueError,
            r"\[x0, y0, x1, y1, class\]",
        ),
        ({"methods": "gradcam"}, TypeError, "list of method names"),
        ({"metrics": "deletion"}, TypeError, "metrics"),
    ],
)
def test_runner_rejects_bad_arguments_by_name(kwargs, error, message):
    model = seeded(ConvGapFc(dims=2))
    args = {"methods": ["gradcam"], "metrics": ["deletion"], **kwargs}
    with pytest.raises(error, match=message):
        evaluate(model, _images((3, 8, 8), count=1), progress=False, **args)


def test_runner_rejects_bad_images():
    model = seeded(ConvGapFc(dims=2))
    with pytest.raises(TypeError, match="images"):
        evaluate(model, torch.zeros(1, 3, 8, 8), ["gradcam"], ["deletion"], progress=False)
    with pytest.raises(ValueError, match="'a'.*float tensor"):
        evaluate(model, [("a", torch.zeros(8, 8))], ["gradcam"], ["deletion"], progress=False)
    twice = [("a", torch.zeros(3, 8, 8))] * 2
    with pytest.raises(ValueError, match="unique"):
        evaluate(model, twice, ["gradcam"], ["deletion"], progress=False)


# --------------------------------------------------------------------------- boxes


def test_boxes_through_crop_box_by_hand():
    model = evidencemap.models.load("efficientnet-lite0")
    # chelsea is 451 × 300: the short side 300 → 256, width round(451·256/300) = 385, centre
    # crop 224: left (385−224)//2 = 80, top (256−224)//2 = 16
    crop = model.preprocess.crop_box(451, 300)
    assert crop == CropBox(451, 300, 385, 256, 80, 16, 224)
    sx, sy = 385 / 451, 256 / 300
    boxes = to_input_boxes([[100, 50, 300, 250, 282], [0, 0, 451, 300, 5]], crop)
    assert boxes[0] == pytest.approx(
        [100 * sx - 80, 50 * sy - 16, 300 * sx - 80, 250 * sy - 16, 282]
    )
    assert boxes[0][:4] == pytest.approx([5.3659, 26.6667, 176.0976, 197.3333], abs=1e-4)
    assert boxes[1] == [0, 0, 224, 224, 5]  # the whole photo: clipped to the crop
    with pytest.raises(
        ValueError, match=r"outside the model's centre crop \(original pixels x 94…356"
    ):
        to_input_boxes([[0, 0, 50, 300, 1]], crop)  # x 0…50 → below 80/sx ≈ 93.7: cut away
    with pytest.raises(ValueError, match="x1 < x0"):
        to_input_boxes([[300, 0, 100, 10, 1]], crop)


def test_boxes_land_on_the_same_pixels_as_the_preprocessing():
    model = evidencemap.models.load("efficientnet-lite0")
    width, height, box = 400, 260, (150, 60, 330, 200)
    photo = np.zeros((height, width, 3), np.uint8)
    photo[box[1] : box[3], box[0] : box[2]] = 255
    x = model.preprocess(Image.fromarray(photo))
    ys, xs = np.nonzero(model.preprocess.to_pixels(x)[0].numpy() > 127)
    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    converted = to_input_boxes([[*box, 0]], model.preprocess.crop_box(width, height))[0]
    assert converted[:4] == pytest.approx(found, abs=1.0)  # bicubic resampling: ±1 pixel


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.png")
    return folder


def _parse(*argv: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    evaluate_command.register(sub)
    return parser.parse_args(["evaluate", *map(str, argv)])


def test_command_on_real_photos_writes_the_report(photos, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    # the cat's head (by index) and the cup (by label), in photo pixels
    boxes.write_text(
        json.dumps(
            {
                "chelsea.png": [[40, 0, 390, 300, TIGER_CAT]],
                "coffee.png": [[170, 15, 420, 300, "espresso"]],
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = _parse(
        photos / "chelsea.png",
        photos / "coffee.png",
        "--methods",
        "gradcam",
        "--metrics",
        "deletion,insertion,average_drop,pointing_game,energy_pointing_game,cost",
        "--boxes",
        boxes,
        "--out",
        out,
        "--quick",
        "--quiet",
        "--device",
        "cpu",
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| gradcam |" in printed
    assert "wrote" in printed
    for name in (
        "summary.md",
        "summary.csv",
        "per_image.csv",
        "per_image.json",
        "deletion_insertion.png",
    ):
        assert (out / name).stat().st_size > 0
    assert not (out / "road.png").exists()  # ROAD was not asked for
    stored = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
    _no_nan(stored)
    records = {r["image"]: r for r in stored["records"]}
    assert records["chelsea.png"]["class"] in range(281, 286)  # a cat
    assert records["coffee.png"]["class"] == ESPRESSO
    # the boxes reached the pointing games, converted to input pixels, classes by label too
    assert {(p["image"], p["class"]) for p in stored["pointing"]} == {
        ("chelsea.png", TIGER_CAT),
        ("coffee.png", ESPRESSO),
    }
    assert all(p["hit"] for p in stored["pointing"])  # Grad-CAM peaks on the cat and the cup
    # Grad-CAM's evidence for espresso (p = 0.95) matters: removing it first hurts more than
    # inserting it first into the blurred photo (the cat, p = 0.39, is too unsure to say)
    coffee = records["coffee.png"]
    assert coffee["deletion_auc"] < coffee["insertion_auc"]
    for r in records.values():
        assert r["seconds_per_image"] > 0


def _fails(capsys, *argv: object) -> tuple[int, str]:
    status = main(["evaluate", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_command_missing_image(photos, tmp_path, capsys):
    args = _parse(photos / "chelsea.png", tmp_path / "nope.png", "--out", tmp_path / "o")
    with pytest.raises(CLIError, match="not found: .*nope.png") as info:
        args.func(args)
    assert info.value.status == 1
    status, err = _fails(capsys, tmp_path / "nope.png", "--out", tmp_path / "o")
    assert status == 1
    assert "evidencemap evaluate: error: image file(s) not found" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"chelsea.png": [[40, 0, 390, 300]]}', "entries must be [x0, y0, x1, y1, class]"),
        ('{"chelsea.png": [[0, 0, 50, 300, 282]]}', "outside the model's centre crop"),
        ('{"chelsea.png": [[40, 0, 390, 300, "no such label"]]}', "no such label"),
        ('{"other.png": [[40, 0, 390, 300, 282]]}', "names none of the images"),
    ],
)
def test_command_bad_boxes_file(photos, tmp_path, capsys, content, message):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content, encoding="utf-8")
    status, err = _fails(
        capsys,
        photos / "chelsea.png",
        "--methods",
        "gradcam",
        "--boxes",
        boxes,
        "--out",
        tmp_path / "o",
        "--quick",
        "--quiet",
    )
    assert status == 2
    assert "--boxes" in err
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "gradcam,nosuch"], "--methods"),
        (["--metrics", "deletion,accuracy"], "unknown metric(s) 'accuracy'"),
        (["--metrics", "pointing_game"], "need --boxes FILE"),
        (["--option", "gradcam:top_k=3"], "takes no option 'top_k'"),
        (["--option", "scorecam:top_k=3"], "not among the methods evaluated"),
    ],
)
def test_command_bad_names_exit_2_before_any_work(photos, tmp_path, capsys, extra, message):
    status, err = _fails(
        capsys, photos / "chelsea.png", "--methods", "gradcam", *extra, "--out", tmp_path / "o"
    )
    assert status == 2
    assert message in err
    assert not (tmp_path / "o").exists()


def test_command_boxes_missing_file(photos, tmp_path, capsys):
    status, err = _fails(
        capsys,
        photos / "chelsea.png",
        "--methods",
        "gradcam",
        "--boxes",
        tmp_path / "x.json",
        "--out",
        tmp_path / "o",
    )
    assert status == 2
    assert "--boxes: file not found" in err


# ------------------------------------------------------------------ the quick protocol

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _docs_row(text: str, setting: str) -> str:
    """The ``quick`` cell of the settings table row that starts with ``setting``."""
    for line in text.splitlines():
        if line.startswith(f"| {setting}"):
            return line.split("|")[2].strip()
    raise AssertionError(f"docs/evaluation.md has no row {setting!r}")


def test_quick_settings_are_the_documented_ones():
    from evidencemap.evaluation import METRIC_NAMES, evaluation_settings

    quick = evaluation_settings(list(METRIC_NAMES), quick=True)
    text = DOCS.read_text(encoding="utf-8")
    assert _docs_row(text, "deletion / insertion steps") == str(quick["deletion"]["steps"]) == "16"
    assert quick["insertion"]["steps"] == 16
    levels = ", ".join(str(p) for p in quick["road"]["percentiles"])
    assert _docs_row(text, "ROAD levels") == levels == "25, 75"
    assert float(_docs_row(text, "ROAD imputation tolerance")) == quick["road"]["tol"]
    assert _docs_row(text, "randomisation stages") == str(quick["sanity"]["stages"]) == "2"
    samples = quick["max_sensitivity"]["samples"]
    assert _docs_row(text, "max-sensitivity samples") == str(samples) == "2"
    full = evaluation_settings(list(METRIC_NAMES), quick=False)
    assert full["deletion"]["steps"] == 224
    assert full["sanity"]["stages"] == 10
    assert full["road"]["tol"] == 1e-5
    assert full["max_sensitivity"]["samples"] == 10
    assert QUICK_METHOD_OPTIONS["fgvis"] == {"max_iterations": 40}
    assert QUICK_METHOD_OPTIONS["scorecam"] == {"top_k": 32}
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    help_text = " ".join(
        parser._subparsers._group_actions[0].choices["evaluate"].format_help().split()
    )
    flat_docs = " ".join(text.split())
    for method, opts in QUICK_METHOD_OPTIONS.items():
        for key, value in opts.items():
            assert f"{key}={value}" in help_text, (method, key)  # the --quick help
            assert f"`{key}={value}`" in flat_docs, (method, key)  # the docs' list


@pytest.mark.slow  # real model, FGVis included: took 13 min on 2 cores shared at load 16
def test_quick_command_on_a_real_photo_shows_progress_per_method_photo_and_metric(tmp_path, capsys):
    """The README's command, cut to one photo and two metrics, FGVis included."""
    photo = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"
    args = _parse(
        photo,
        "--methods",
        "gradcam,fgvis",
        "--metrics",
        "deletion,insertion",
        "--quick",
        "--out",
        tmp_path / "out",
    )
    assert args.func(args) == 0
    err = capsys.readouterr().err
    for method in ("gradcam", "fgvis"):
        for metric in ("deletion", "insertion"):
            assert f"{method} · chelsea.jpg · {metric}" in err
    assert "2/2" in err  # the bar over (method, photo) maps reached its end
    stored = json.loads((tmp_path / "out" / "per_image.json").read_text(encoding="utf-8"))
    assert stored["settings"]["method_options"]["fgvis"] == {"max_iterations": 40}


# ------------------------------------------------------- a metric registered here only


@pytest.fixture
def peak_metric():
    """A metric written outside the library: one class and the decorator, nothing else."""

    @register_metric
    class MapPeak(Metric):
        """Largest value of the map, raised to ``power`` (lower is better)."""

        name = "test_map_peak"
        titles: ClassVar[dict[str, str]] = {"map_peak": "Map peak"}
        directions: ClassVar[dict[str, bool]] = {"map_peak": False}
        OPTIONS = (Option("power", "float", 1.0, "exponent", low=0, low_open=True),)
        QUICK: ClassVar[dict[str, Any]] = {"power": 2.0}

        def __init__(self, *, power: float = 1.0) -> None:
            self.power = self.option("power", power)

        def score(self, context: MetricContext) -> MetricRecord:
            return MetricRecord({"map_peak": float(context.maps.amax()) ** self.power})

    try:
        yield MapPeak
    finally:
        unregister_metric(MapPeak.name)


def test_a_metric_registered_in_a_test_is_evaluated_listed_and_summarised(peak_metric, tmp_path):
    model = seeded(ConvGapFc(dims=2))
    images = _images((3, 16, 16))
    assert "test_map_peak" in METRIC_NAMES
    assert COLUMNS["map_peak"] == ("Map peak", False)
    assert describe_metric("test_map_peak").quick == {"power": 2.0}
    results = evaluate(
        model,
        images,
        ["gradcam"],
        ["deletion", "test_map_peak"],
        quick=True,
        progress=False,
        out_dir=tmp_path,
    )
    assert results.columns == ["deletion_auc", "map_peak"]
    assert results.settings["metrics"]["test_map_peak"] == {"power": 2.0}
    peaks = [r["map_peak"] for r in results.records]
    assert peaks == pytest.approx([1.0, 1.0])  # normalised maps peak at 1, squared
    assert results.summary()["gradcam"]["map_peak"][0] == pytest.approx(1.0)
    assert "Map peak ↓" in results.to_markdown()
    assert "Map peak ↓" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    rows = _read_csv(tmp_path / "summary.csv")
    assert {r["metric"] for r in rows} == {"deletion_auc", "map_peak"}
    # the default metric list and the option checks read the registry too
    assert "test_map_peak" in evidencemap.evaluation.default_metrics(None)
    with pytest.raises(ValueError, match="test_map_peak option power must be a number > 0"):
        evaluate(
            model,
            images,
            ["gradcam"],
            ["test_map_peak"],
            progress=False,
            metric_options={"test_map_peak": {"power": 0}},
        )
    # the command offers it and checks its options before loading any model
    args = _parse(
        tmp_path / "x.png", "--metrics", "test_map_peak", "--metric-option", "test_map_peak:power=3"
    )
    assert evaluate_command._metrics(args) == (["test_map_peak"], {"test_map_peak": {"power": 3}})
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["evaluate"].format_help()
    assert "test_map_peak" in " ".join(help_text.split())


def test_builtin_metrics_describe_their_contract():
    for name in METRIC_NAMES:
        spec = describe_metric(name)
        assert spec.columns
        assert spec.doc
        assert spec.needs <= {"maps", "explainer", "boxes"}
        for values in (spec.evaluation, spec.quick):
            for key, value in values.items():
                spec.options[key].check(value)
        json.dumps(spec.as_dict())
    assert describe_metric("pointing_game").needs == {"maps", "explainer", "boxes"}
    assert describe_metric("road").quick["percentiles"] == QUICK_ROAD_LEVELS
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        describe_metric("accuracy")
    with pytest.raises(ValueError, match="already registered"):

        @register_metric
        class Again(Metric):
            name = "road"
            titles: ClassVar[dict[str, str]] = {"x": "x"}
            directions: ClassVar[dict[str, bool]] = {"x": True}

            def score(self, context: MetricContext) -> MetricRecord:
                return MetricRecord({"x": 0.0})


# ------------------------------------------- methods that do not apply, fail or warn


class _FailingGradCAM(GradCAM):
    name = "test-failing-gradcam"
    aliases = ()

    def channel_weights(self, acts, grads, context):
        raise RuntimeError("this method always fails")


class _WarningGradCAM(GradCAM):
    name = "test-warning-gradcam"
    aliases = ()

    def channel_weights(self, acts, grads, context):
        warnings.warn("the map is flat (test warning)", UserWarning, stacklevel=2)
        return super().channel_weights(acts, grads, context)


def test_default_methods_are_those_that_apply_and_the_others_are_named(tmp_path):
    model = seeded(ConvGapFc(dims=2))
    results = evaluate(
        model,
        _images((3, 16, 16), count=1),
        None,
        ["cost"],
        quick=True,
        progress=False,
        out_dir=tmp_path,
    )
    applicable = [m for m, why in applicable_methods(model).items() if why is None]
    assert results.methods == applicable
    assert "gradcam" in results.methods
    assert "attention_rollout" not in results.methods
    assert "transformer" in results.skipped["attention_rollout"]
    assert results.failed == {}
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "Left out (they do not apply to this model): attention_rollout" in text


def test_a_method_that_fails_or_does_not_apply_is_reported_and_the_others_finish(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(METHODS, _FailingGradCAM.name, _FailingGradCAM)
    model = seeded(ConvGapFc(dims=2))
    results = evaluate(
        model,
        _images((3, 16, 16)),
        ["attention_rollout", _FailingGradCAM.name, "gradcam"],
        ["deletion", "cost"],
        quick=True,
        progress=False,
        out_dir=tmp_path,
    )
    assert results.methods == ["gradcam"]
    assert "transformer" in results.failed["attention_rollout"]
    assert "this method always fails" in results.failed[_FailingGradCAM.name]
    assert [r["method"] for r in results.records] == ["gradcam", "gradcam"]
    stored = json.loads((tmp_path / "per_image.json").read_text(encoding="utf-8"))
    assert set(stored["failed"]) == {"attention_rollout", _FailingGradCAM.name}
    assert "| gradcam |" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "Failed (no numbers)" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_each_distinct_warning_once_per_method_and_image(monkeypatch):
    monkeypatch.setitem(METHODS, _WarningGradCAM.name, _WarningGradCAM)
    model = seeded(ConvGapFc(dims=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate(
            model,
            _images((3, 16, 16)),
            [_WarningGradCAM.name],
            ["adcc", "max_sensitivity", "sanity"],  # each calls the method again
            quick=True,
            progress=False,
        )
    shown = [w for w in caught if "test warning" in str(w.message)]
    assert len(shown) == 2  # one per image, not one per call
    assert [(w["image"], w["category"]) for w in results.warnings] == [
        ("img0", "UserWarning"),
        ("img1", "UserWarning"),
    ]


def test_command_evaluates_what_applies_and_reports_what_fails(photos, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(
        [
            "evaluate",
            str(photos / "chelsea.png"),
            "--methods",
            "attention_rollout,gradcam",
            "--metrics",
            "cost",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert status == 1  # a method failed; the others' tables are written
    assert "| gradcam |" in captured.out
    assert "attention_rollout FAILED" in captured.err
    assert "transformer" in captured.err
    stored = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in stored["records"]] == ["gradcam"]


@pytest.mark.slow  # every method on a real photo (about a minute on 2 cores)
def test_command_default_methods_on_a_cnn(tmp_path, capsys):
    photo = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"
    out = tmp_path / "out"
    status = main(
        ["evaluate", str(photo), "--metrics", "cost", "--quick", "--quiet", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "left out attention_rollout" in captured.err
    assert "| gradcam |" in captured.out
    assert "| fgvis |" in captured.out
    assert (out / "summary.md").is_file()


def test_every_curve_has_its_own_colour_and_dash():
    styles = [evidencemap.evaluation.line_style(i) for i in range(80)]
    assert len({(tuple(s["color"]), s["linestyle"]) for s in styles}) == 80
    assert len({tuple(s["color"]) for s in styles[:20]}) == 20  # 20 methods: 20 colours


def test_command_prints_each_warning_once_on_one_line(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, _WarningGradCAM.name, _WarningGradCAM)
    status = main(
        [
            "evaluate",
            str(photos / "chelsea.png"),
            "--methods",
            _WarningGradCAM.name,
            "--metrics",
            "adcc,cost",
            "--quick",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 0, err
    lines = [line for line in err.splitlines() if "test warning" in line]
    assert lines == [lines[0]]  # once, though both metrics call the method
    assert lines[0].startswith("evidencemap evaluate: warning: UserWarning: ")
    assert "warnings.warn" not in err  # no Python source line under it
