"""Run every method × metric on a set of images and write the tables, curves and numbers.

``evaluate(model, images, methods, metrics)`` explains each image (its top-1 class) with each
method, scores the maps with each metric of :mod:`evidencemap.metrics`, and returns an
:class:`EvaluationResults`; with ``out_dir`` it writes

* ``summary.md`` / ``summary.csv``: mean ± sample standard deviation over images per method
  and metric, ↑ / ↓ marking the better direction (best mean in bold in the Markdown table);
* ``per_image.csv`` / ``per_image.json``: every number per (image, method), the JSON with the
  curves and the settings;
* ``deletion_insertion.png`` and ``road.png``: the mean curves per method.

Methods are looked up by name (:func:`evidencemap.get_method`), so every registered method
works; ``method_options`` passes options per method name. ``quick=True`` runs a short
protocol (fewer curve steps, ROAD levels and a looser ROAD imputation tolerance, fewer
randomisation stages and sensitivity samples) and
gives slow methods the fast options of :data:`QUICK_METHOD_OPTIONS` (e.g. Score-CAM
``top_k=64``); the settings used are part of the results and of ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from evidencemap.checks import check_model
from evidencemap.methods import METHODS, build, describe, get_method
from evidencemap.methods import method_names as registered_methods
from evidencemap.metrics import (
    ADCC,
    METRICS,
    ROAD,
    AverageDrop,
    Cost,
    Deletion,
    EnergyPointingGame,
    Insertion,
    MaxSensitivity,
    ModelRandomisation,
    PointingGame,
)
from evidencemap.metrics.common import Explainer
from evidencemap.models.preprocess import CropBox

__all__ = [
    "COLUMNS",
    "METRIC_NAMES",
    "QUICK_METHOD_OPTIONS",
    "EvaluationResults",
    "evaluate",
    "make_explainer",
    "to_input_boxes",
]

METRIC_NAMES: tuple[str, ...] = (
    "deletion",
    "insertion",
    "average_drop",
    "adcc",
    "pointing_game",
    "energy_pointing_game",
    "road",
    "sanity",
    "max_sensitivity",
    "cost",
)
"""The metrics :func:`evaluate` knows, in table order."""

_METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(METRICS[name].titles) for name in METRIC_NAMES
}
"""metric name → its columns, as each metric class describes them (``titles``)."""

COLUMNS: dict[str, tuple[str, bool]] = {
    column: (METRICS[name].titles[column], METRICS[name].directions[column])
    for name in METRIC_NAMES
    for column in METRICS[name].titles
}
"""column → (title, higher is better), in table order; read from the metric classes."""

QUICK_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "scorecam": {"top_k": 32},
    "fgvis": {"max_iterations": 40},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 8},
}
"""Constructor options quick mode gives a method (canonical name → options), the one place they
live. An option the method's constructor does not take is left out, so the table may name
methods that are not registered; ``method_options`` given to :func:`evaluate` win."""


def _settings(quick: bool, seed: int, batch_size: int) -> dict[str, Any]:
    return {
        "quick": quick,
        "seed": seed,
        "batch_size": batch_size,
        "curve_steps": 16 if quick else 224,
        "road_percentiles": [25, 75] if quick else list(range(10, 100, 10)),
        # ROAD's conjugate-gradient tolerance: 1e-3 moves the probabilities by < 1e-3 on the
        # built-in model and photos (against 1e-5) at about a third of the iterations
        "road_tol": 1e-3 if quick else 1e-5,
        "sanity_stages": 2 if quick else 10,
        "sensitivity_samples": 2 if quick else 10,
        "sensitivity_radius": 0.02,
        "pointing_tolerance": 15.0,
        "target": "top-1 class of each image (softmax probability for the curves)",
    }


def make_explainer(
    model: nn.Module, method: str, options: Mapping[str, Any] | None = None
) -> Explainer:
    """The method ``method`` bound to ``model`` with ``options`` (``layer`` included).

    Raises:
        ValueError: for an unknown method name or option (:func:`evidencemap.methods.build`).
    """
    opts = dict(options or {})
    return build(method, model, opts.pop("layer", None), **opts)


@dataclass
class EvaluationResults:
    """What :func:`evaluate` measured.

    Attributes:
        records: one dict per (image, method): ``image``, ``method`` and a value per column.
        pointing: one dict per (image, method, ground-truth class): ``hit`` and ``energy``.
        curves: method → ``{"deletion": [[…] per image], "insertion": …, "fractions": […],
            "road_morf": …, "road_lerf": …, "road_percentiles": […]}``.
        settings: the protocol's settings.
        methods: the methods, in order.
        columns: the columns measured, in order.
    """

    records: list[dict[str, Any]]
    pointing: list[dict[str, Any]]
    curves: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    methods: list[str]
    columns: list[str]
    files: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """method → column → ``(mean, sample std, count)`` (std ``nan`` for one value).

        The pointing game's mean is the mean over classes of the per-class hit rate, its std
        that over classes.
        """
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for method in self.methods:
            rows = [r for r in self.records if r["method"] == method]
            out[method] = {}
            for col in self.columns:
                if col == "pointing_game":
                    values = self._pointing_rates(method)
                else:
                    values = [r[col] for r in rows if r.get(col) is not None]
                values = [v for v in values if v is not None and math.isfinite(v)]
                if not values:
                    out[method][col] = (math.nan, math.nan, 0)
                    continue
                std = statistics.stdev(values) if len(values) > 1 else math.nan
                out[method][col] = (statistics.fmean(values), std, len(values))
        return out

    def _pointing_rates(self, method: str) -> list[float]:
        hits: dict[int, list[bool]] = {}
        for p in self.pointing:
            if p["method"] == method:
                hits.setdefault(p["class"], []).append(p["hit"])
        return [sum(h) / len(h) for h in hits.values()]

    def to_markdown(self) -> str:
        """The summary table (mean ± std; ↑ higher / ↓ lower is better; best mean in bold).

        Every mean that, as printed, equals the best one is bold (methods that tie all are).
        """
        summary = self.summary()
        head = ["method"] + [
            f"{COLUMNS[c][0]} {'↑' if COLUMNS[c][1] else '↓'}" for c in self.columns
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best: dict[str, float] = {}
        for col in self.columns:
            means = [summary[m][col][0] for m in self.methods if math.isfinite(summary[m][col][0])]
            if means and max(means) > min(means):  # no winner when all are equal
                best[col] = max(means) if COLUMNS[col][1] else min(means)
        for method in self.methods:
            cells = [method]
            for col in self.columns:
                mean, std, _ = summary[method][col]
                if not math.isfinite(mean):
                    cells.append("—")
                    continue
                text = _fmt(mean) + ("" if not math.isfinite(std) else f" ± {_fmt(std)}")
                # bold every mean that reads as the best (equal methods tie, not the one
                # that wins in the 7th digit)
                winner = col in best and _fmt(mean) == _fmt(best[col])
                cells.append(f"**{text}**" if winner else text)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write the tables, per-image numbers and plots to ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        files = []
        md = out / "summary.md"
        images = sorted({r["image"] for r in self.records})
        shown = dict(self.settings)
        shown["method_options"] = {m: o for m, o in shown.get("method_options", {}).items() if o}
        settings = ", ".join(f"{k}={v}" for k, v in shown.items())
        md.write_text(
            "# Evaluation\n\n"
            f"{len(images)} images ({', '.join(images)}); mean ± sample std over images; "
            "↑ higher is better, ↓ lower is better; best mean in bold.\n\n"
            f"Settings: {settings}.\n\n" + self.to_markdown(),
            encoding="utf-8",
        )
        files.append(md)
        path = out / "summary.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "metric", "higher_is_better", "mean", "std", "n"])
            for method in self.methods:
                for col in self.columns:
                    mean, std, n = summary[method][col]
                    writer.writerow([method, col, COLUMNS[col][1], _cell(mean), _cell(std), n])
        files.append(path)
        path = out / "per_image.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "method", "class", *self.columns])
            writer.writeheader()
            for r in self.records:
                writer.writerow({k: r.get(k) for k in ["image", "method", "class", *self.columns]})
        files.append(path)
        path = out / "per_image.json"
        path.write_text(
            json.dumps(
                {
                    "settings": self.settings,
                    "directions": {c: COLUMNS[c][1] for c in self.columns},
                    "records": self.records,
                    "pointing": self.pointing,
                    "curves": self.curves,
                },
                indent=1,
                allow_nan=False,
                default=_json_default,
            ),
            encoding="utf-8",
        )
        files.append(path)
        files.extend(self._plots(out))
        self.files = files
        return files

    def _plots(self, out: Path) -> list[Path]:
        files = []
        have = [
            m
            for m in self.methods
            if "deletion" in self.curves.get(m, {}) or "insertion" in self.curves.get(m, {})
        ]
        if have:
            fig = Figure(figsize=(11, 4.2), layout="constrained")
            for ax, key, better in zip(
                fig.subplots(1, 2), ("deletion", "insertion"), ("lower", "higher"), strict=True
            ):
                for method in have:
                    curves = self.curves[method].get(key)
                    if not curves:
                        continue
                    grid, mean = _mean_curve(curves, self.curves[method][f"{key}_fractions"])
                    area = statistics.fmean(
                        r[f"{key}_auc"]
                        for r in self.records
                        if r["method"] == method and r.get(f"{key}_auc") is not None
                    )
                    ax.plot(grid.tolist(), mean.tolist(), label=f"{method} ({area:.3f})")
                ax.set_title(
                    f"{key.capitalize()} (mean over images; AUC in legend, {better} is better)",
                    fontsize=9,
                )
                ax.set_xlabel(
                    "fraction of pixels " + ("removed" if key == "deletion" else "inserted")
                )
                ax.set_ylabel("softmax probability of the class")
                ax.set_xlim(0, 1)
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            path = out / "deletion_insertion.png"
            fig.savefig(path, dpi=110)
            files.append(path)
        have = [m for m in self.methods if "road_morf" in self.curves.get(m, {})]
        if have:
            fig = Figure(figsize=(11, 4.2), layout="constrained")
            for ax, key, title in zip(
                fig.subplots(1, 2),
                ("road_morf", "road_lerf"),
                ("ROAD MoRF (lower is better)", "ROAD LeRF (higher is better)"),
                strict=True,
            ):
                for method in have:
                    mean = torch.tensor(self.curves[method][key]).mean(0)
                    ax.plot(
                        self.curves[method]["road_percentiles"],
                        mean.tolist(),
                        marker="o",
                        label=method,
                    )
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("pixels removed and imputed (%)")
                ax.set_ylabel("change of the class probability")
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            path = out / "road.png"
            fig.savefig(path, dpi=110)
            files.append(path)
        return files


def _mean_curve(curves: list[list[float]], fractions: list[list[float]]) -> tuple[Tensor, Tensor]:
    """Mean of per-image curves, each linearly interpolated onto one grid of fractions.

    Images of different sizes give curves with different fractions; one grid of 101 points
    (or the images' common fractions, when they share them) puts them on a common x axis.
    """
    if all(f == fractions[0] for f in fractions):
        return torch.tensor(fractions[0]), torch.tensor(curves).mean(0)
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    rows = []
    for curve, xs in zip(curves, fractions, strict=True):
        x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(curve, dtype=torch.float64)
        i = torch.searchsorted(x, grid, right=True).clamp(1, len(x) - 1)
        w = ((grid - x[i - 1]) / (x[i] - x[i - 1])).clamp(0, 1)
        rows.append(y[i - 1] + w * (y[i] - y[i - 1]))
    return grid, torch.stack(rows).mean(0)


def _fmt(value: float) -> str:
    return (
        f"{value:.3g}"
        if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3)
        else f"{value:.3f}"
    )


def _cell(value: float) -> float | str:
    """A CSV cell: the number, or empty where it is undefined (no value, or std of one)."""
    return value if math.isfinite(value) else ""


def _finite(value: float) -> float | None:
    """``value``, or ``None`` where a metric gave NaN / ±inf (never written as a number)."""
    return value if math.isfinite(value) else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _check_images(images: Any) -> list[tuple[str, Tensor]]:
    if isinstance(images, (str, bytes, Tensor)) or not isinstance(images, Sequence) or not images:
        raise TypeError("images must be a non-empty list of (name, tensor) pairs")
    out = []
    for i, item in enumerate(images):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"images[{i}] must be a (name, tensor) pair")
        name, x = item
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            raise ValueError(
                f"image {name!r} must be a float tensor (C, H, W) or (C, D, H, W), got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}"
            )
        out.append((name, x))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("image names must be unique")
    return out


def _check_names(values: Any, known: Sequence[str], what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{what} must be a non-empty list of names")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} must be names (strings), got {bad[0]!r}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    return list(dict.fromkeys(values))


def _boxes_by_class(entries: Any, name: str) -> dict[int, list[list[float]]]:
    """``[[x0, y0, x1, y1, class], …]`` (or 3-D ``[x0, y0, z0, x1, y1, z1, class]``) by class."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(f"boxes[{name!r}] must be a list of [x0, y0, x1, y1, class]")
    out: dict[int, list[list[float]]] = {}
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) not in (5, 7):
            raise ValueError(
                f"boxes[{name!r}] entries must be [x0, y0, x1, y1, class] "
                f"(3-D: [x0, y0, z0, x1, y1, z1, class]), got {entry!r}"
            )
        *box, cls = entry
        if isinstance(cls, bool) or not isinstance(cls, int) or cls < 0:
            raise ValueError(f"boxes[{name!r}]: the class must be an int index >= 0, got {cls!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
            raise ValueError(f"boxes[{name!r}]: box coordinates must be numbers, got {entry!r}")
        out.setdefault(cls, []).append([float(v) for v in box])
    return out


def to_input_boxes(
    entries: Sequence[Sequence[Any]], crop: CropBox, name: str = "image"
) -> list[list[Any]]:
    """Boxes in original-photo pixels → model-input pixels through the resize and centre crop.

    With ``crop = model.preprocess.crop_box(width, height)`` (:class:`CropBox`),
    ``x' = clip(x · resized_width / width − left, 0, size)`` and the same down
    (:meth:`CropBox.to_input`). The class (the last element) is kept.

    Args:
        entries: ``[[x0, y0, x1, y1, class], …]`` in the photo's pixels (x right, y down).
        crop: the preprocessing's crop of that photo.
        name: the photo's name, for error messages.

    Returns:
        ``[[x0', y0', x1', y1', class], …]`` in the ``size × size`` model input.

    Raises:
        ValueError: for a malformed entry, or a box that lies wholly outside the crop (it would
            leave the pointing game nothing to point at).
    """
    out: list[list[Any]] = []
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 5
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in entry[:4])
        ):
            raise ValueError(
                f"boxes[{name!r}] entries must be [x0, y0, x1, y1, class], got {entry!r}"
            )
        x0, y0, x1, y1 = (float(v) for v in entry[:4])
        if x1 < x0 or y1 < y0:
            raise ValueError(f"boxes[{name!r}]: box {entry!r} has x1 < x0 or y1 < y0")
        box = list(crop.to_input((x0, y0, x1, y1)))
        if box[2] <= box[0] or box[3] <= box[1]:
            left, top, right, bottom = crop.region()
            raise ValueError(
                f"boxes[{name!r}]: box {entry!r} lies outside the model's centre crop "
                f"(original pixels x {left:.0f}…{right:.0f}, y {top:.0f}…{bottom:.0f})"
            )
        out.append([*box, entry[4]])
    return out


def _method_names(methods: Any) -> list[str]:
    """Canonical names of ``methods`` (aliases accepted; default: every registered method)."""
    if methods is None:
        return registered_methods()
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError("methods must be a non-empty list of method names")
    bad = [m for m in methods if not isinstance(m, str)]
    if bad:
        raise TypeError(f"methods must be names (strings), got {bad[0]!r}")
    unknown = [m for m in methods if m.lower() not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(registered_methods())}"
        )
    return list(dict.fromkeys(get_method(m).name for m in methods))


def _method_options(
    methods: Sequence[str], given: Mapping[str, Mapping[str, Any]] | None, quick: bool
) -> dict[str, dict[str, Any]]:
    """Constructor options per method: quick mode's (those the method takes), then ``given``."""
    options: dict[str, dict[str, Any]] = {}
    for m in methods:
        spec = describe(m)
        accepted = set(spec.options)
        if spec.forwards_to:  # SmoothGrad: the wrapped method's options too
            accepted |= set(describe(spec.options[spec.forwards_to].default).options)
        quick_opts = QUICK_METHOD_OPTIONS.get(m, {}) if quick else {}
        options[m] = {k: v for k, v in quick_opts.items() if k in accepted}
    if given is None:
        return options
    if not isinstance(given, Mapping):
        raise TypeError("method_options must be a mapping method name → options")
    for name, extra in given.items():
        canonical = (
            get_method(name).name if isinstance(name, str) and name.lower() in METHODS else name
        )
        if canonical not in options:
            raise ValueError(
                f"method_options names {name!r}, which is not among the methods {list(methods)}"
            )
        if not isinstance(extra, Mapping):
            raise TypeError(f"method_options[{name!r}] must be a mapping option → value")
        options[canonical].update(extra)
    return options


def evaluate(
    model: nn.Module,
    images: Sequence[tuple[str, Tensor]],
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    boxes: Mapping[str, Sequence[Sequence[float]]] | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    out_dir: str | Path | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> EvaluationResults:
    """Evaluate ``methods`` on ``images`` with ``metrics`` (module docstring).

    Args:
        model: the classifier (used as given; its mode and parameters are left as found).
        images: ``(name, tensor)`` pairs, each tensor one normalised input ``(C, H, W)`` or
            ``(C, D, H, W)``.
        methods: registered method names (default: every registered method).
        metrics: names from :data:`METRIC_NAMES` (default: all, the pointing games only when
            ``boxes`` are given).
        boxes: image name → ``[[x0, y0, x1, y1, class], …]`` in model-input pixels (2-D only).
        quick: the short protocol (see ``EvaluationResults.settings``).
        progress: show a tqdm progress bar.
        out_dir: where to write the tables and plots (nothing written when ``None``).
        method_options: method name → options for its constructor (``layer`` included); they
            override quick mode's defaults.
        device: where to run (default: the model's device).
        batch_size: perturbed inputs per forward pass in the metrics.
        seed: seed of every random choice.

    Returns:
        The :class:`EvaluationResults` (also written to ``out_dir`` when given).

    Raises:
        TypeError / ValueError: for invalid arguments (unknown method or metric, boxes without
            the pointing game's images, …).
    """
    model = check_model(model)
    images = _check_images(images)
    methods = _method_names(methods)
    if metrics is None:
        metrics = [m for m in METRIC_NAMES if boxes or "pointing" not in m]
    metrics = _check_names(metrics, METRIC_NAMES, "metrics")
    pointing_wanted = {"pointing_game", "energy_pointing_game"} & set(metrics)
    if pointing_wanted and not boxes:
        raise ValueError(f"metrics {sorted(pointing_wanted)} need boxes")
    boxes_by: dict[str, dict[int, list[list[float]]]] = {}
    if boxes:
        if not isinstance(boxes, Mapping):
            raise TypeError("boxes must be a mapping image name → list of [x0, y0, x1, y1, class]")
        names = {n for n, _ in images}
        unknown = set(boxes) - names
        if unknown:
            raise ValueError(f"boxes name images that are not evaluated: {sorted(unknown)}")
        boxes_by = {n: _boxes_by_class(v, n) for n, v in boxes.items()}
    model_device = next((p.device for p in model.parameters()), None)
    device = torch.device(device) if device is not None else model_device or torch.device("cpu")
    if model_device is not None and model_device != device:
        raise ValueError(
            f"device {device} differs from the model's device {model_device}; move the model "
            "there first (model.to(device))"
        )
    settings = _settings(bool(quick), int(seed), int(batch_size))
    options = _method_options(methods, method_options, bool(quick))
    settings["method_options"] = options

    columns = [c for m in metrics for c in _METRIC_COLUMNS[m]]
    tools = _make_metrics(model, metrics, settings)
    records: list[dict[str, Any]] = []
    pointing: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {m: {} for m in methods}
    bar = tqdm(total=len(methods) * len(images), disable=not progress, desc="evaluate", unit="map")
    try:
        for method in methods:
            explainer = make_explainer(model, method, options[method])
            explainer(images[0][1].unsqueeze(0).to(device), None)  # warm-up, not measured
            for name, tensor in images:
                bar.set_postfix_str(f"{method} · {name}")
                x = tensor.unsqueeze(0).to(device)
                record, extra = _evaluate_one(
                    model,
                    explainer,
                    x,
                    metrics,
                    tools,
                    boxes_by.get(name),
                    device,
                    settings,
                    partial(_show_metric, bar, f"{method} · {name}"),
                )
                records.append({"image": name, "method": method, **record})
                pointing.extend(
                    {"image": name, "method": method, **p} for p in extra.pop("pointing", [])
                )
                for key, value in extra.items():
                    if key.endswith("percentiles"):  # the same levels for every image
                        curves[method][key] = value
                    else:  # per image (fractions too: they depend on the image's size)
                        curves[method].setdefault(key, []).append(value)
                bar.update(1)
    finally:
        bar.close()
    results = EvaluationResults(records, pointing, curves, settings, methods, columns)
    if out_dir is not None:
        results.write(out_dir)
    return results


def _make_metrics(model: nn.Module, metrics: Sequence[str], s: Mapping[str, Any]) -> dict[str, Any]:
    bs, seed = s["batch_size"], s["seed"]
    make = {
        "deletion": lambda: Deletion(model, batch_size=bs, seed=seed),
        "insertion": lambda: Insertion(model, batch_size=bs, seed=seed),
        "average_drop": lambda: AverageDrop(model, batch_size=bs),
        "adcc": lambda: ADCC(model, batch_size=bs),
        "pointing_game": lambda: PointingGame(s["pointing_tolerance"]),
        "energy_pointing_game": lambda: EnergyPointingGame(),
        "road": lambda: ROAD(
            model, percentiles=s["road_percentiles"], batch_size=bs, seed=seed, tol=s["road_tol"]
        ),
        "sanity": lambda: ModelRandomisation(model, stages=s["sanity_stages"], seed=seed),
        "max_sensitivity": lambda: MaxSensitivity(
            model, radius=s["sensitivity_radius"], samples=s["sensitivity_samples"], seed=seed
        ),
    }
    return {m: make[m]() for m in metrics if m in make}


def _show_metric(bar: tqdm, where: str, metric: str) -> None:
    bar.set_postfix_str(f"{where} · {metric}")


def _evaluate_one(
    model: nn.Module,
    explainer: Explainer,
    x: Tensor,
    metrics: Sequence[str],
    tools: Mapping[str, Any],
    boxes: Mapping[int, list[list[float]]] | None,
    device: torch.device,
    s: Mapping[str, Any],
    on_metric: Callable[[str], None] = lambda metric: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every metric on one image ``x`` ``(1, C, *S)`` for one method (``on_metric(name)``
    before each, for the progress bar)."""
    explanation, cost = Cost(device)(lambda: explainer(x, None), images=1)
    maps = explanation.maps if hasattr(explanation, "maps") else explanation
    classes = getattr(explanation, "targets", None)
    target = classes if isinstance(classes, Tensor) else None
    record: dict[str, Any] = {"class": None if target is None else int(target[0])}
    extra: dict[str, Any] = {}
    positions = maps[0].numel()
    step = max(1, math.ceil(positions / s["curve_steps"]))
    for metric in metrics:
        on_metric(metric)
        tool = tools.get(metric)
        if metric in ("deletion", "insertion"):
            tool.step = step
            result = tool(x, maps, target)
            record[f"{metric}_auc"] = float(result.auc[0])
            extra[metric] = result.curves[0].tolist()
            extra[f"{metric}_fractions"] = result.fractions.tolist()
        elif metric == "average_drop":
            result = tool(x, maps, target)
            record["average_drop"] = float(result.drop[0])
            record["increase_in_confidence"] = float(result.increase[0])
        elif metric == "adcc":
            result = tool(x, maps, explainer, target)
            record.update(
                adcc=float(result.adcc[0]),
                adcc_average_drop=float(result.average_drop[0]),
                coherency=float(result.coherency[0]),
                complexity=float(result.complexity[0]),
            )
        elif metric == "road":
            result = tool(x, maps, target)
            record.update(
                road_combined=float(result.combined[0]),
                road_morf=float(result.morf[0].mean()),
                road_lerf=float(result.lerf[0].mean()),
            )
            extra["road_morf"] = result.morf[0].tolist()
            extra["road_lerf"] = result.lerf[0].tolist()
            extra["road_percentiles"] = result.percentiles.tolist()
        elif metric == "sanity":
            result = tool(x, explainer, target)
            record["sanity_spearman"] = float(result.spearman[0].mean())
            record["sanity_ssim"] = float(result.ssim[0].mean())
        elif metric == "max_sensitivity":
            record["max_sensitivity"] = float(tool(x, explainer, target)[0])
        elif metric == "cost":
            record["seconds_per_image"] = cost.seconds_per_image
            record["peak_memory_mb"] = None if cost.peak_bytes is None else cost.peak_bytes / 2**20
    if boxes and ({"pointing_game", "energy_pointing_game"} & set(metrics)):
        hits, energies = [], []
        entries = []
        for cls, class_boxes in sorted(boxes.items()):
            if target is not None and cls == int(target[0]):
                class_maps = maps
            else:
                class_maps = explainer(x, [cls]).maps
            entry: dict[str, Any] = {"class": cls}
            if "pointing_game" in metrics:
                hit = bool(PointingGame(s["pointing_tolerance"])(class_maps, [class_boxes]).hits[0])
                entry["hit"] = hit
                hits.append(hit)
            if "energy_pointing_game" in metrics:
                energy = float(EnergyPointingGame()(class_maps, [class_boxes])[0])
                entry["energy"] = energy
                energies.append(energy)
            entries.append(entry)
        extra["pointing"] = entries
        if hits:
            record["pointing_game"] = sum(hits) / len(hits)
        if energies:
            record["energy_pointing_game"] = sum(energies) / len(energies)
    record = {k: _finite(v) if isinstance(v, float) else v for k, v in record.items()}
    for key, value in extra.items():
        if key != "pointing":
            extra[key] = [_finite(v) for v in value]
    return record, extra
