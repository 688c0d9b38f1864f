"""The report writers of an evaluation: :class:`EvaluationResults`, its tables, CSV/JSON and plots.

``summary.md`` / ``summary.csv`` hold the mean ± sample standard deviation over images per
method and column (↑ / ↓ mark the better direction; best mean in bold in the Markdown table);
``per_image.csv`` / ``per_image.json`` every number per (image, method), the JSON with the
curves, the settings, the methods left out or failed and the warnings;
``deletion_insertion.png`` and ``road.png`` the mean curves per method. Column titles and
directions come from the metric registry (:mod:`evidencemap.metrics.base`).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from evidencemap.metrics.base import METRIC_REGISTRY, Metric

__all__ = ["COLUMNS", "EvaluationResults", "column_metric", "line_style"]


class _Columns(Mapping[str, tuple[str, bool]]):
    """column → (title, higher is better), in table order, read from the registry each time
    (so a metric registered later is in it)."""

    def _table(self) -> dict[str, tuple[str, bool]]:
        return {
            column: (cls.titles[column], cls.directions[column])
            for cls in METRIC_REGISTRY.values()
            for column in cls.titles
        }

    def __getitem__(self, column: str) -> tuple[str, bool]:
        return self._table()[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


COLUMNS: Mapping[str, tuple[str, bool]] = _Columns()
"""column → (title, higher is better), in table order; read from the registered metrics."""


def column_metric(column: str) -> type[Metric] | None:
    """The registered metric that reports ``column`` (``None`` when none does)."""
    for cls in METRIC_REGISTRY.values():
        if column in cls.titles:
            return cls
    return None


def _column_info(column: str) -> tuple[str, bool]:
    """(title, higher is better) of ``column``; a column no metric reports any more keeps its
    name and counts as higher-is-better."""
    cls = column_metric(column)
    return (cls.titles[column], cls.directions[column]) if cls else (column, True)


@dataclass
class EvaluationResults:
    """What :func:`evaluate` measured.

    Attributes:
        records: one dict per (image, method): ``image``, ``method`` and a value per column.
        pointing: one dict per (image, method, ground-truth class): ``hit`` and ``energy``.
        curves: method → ``{"deletion": [[…] per image], "insertion": …, "fractions": […],
            "road_morf": …, "road_lerf": …, "road_percentiles": […]}``.
        settings: the protocol's settings.
        methods: the methods that ran to the end, in order.
        columns: the columns measured, in order.
        files: the files :meth:`write` wrote.
        skipped: method → why it was left out (it does not apply to the model).
        failed: method → the error that stopped it (its numbers are left out).
        warnings: one dict per distinct warning of a (method, image) run: ``method``,
            ``image``, ``category``, ``message``.
    """

    records: list[dict[str, Any]]
    pointing: list[dict[str, Any]]
    curves: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    methods: list[str]
    columns: list[str]
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """method → column → ``(mean, sample std, count)`` (std ``nan`` for one value).

        The values are those the column's metric gives (``Metric.summarise``): by default one
        per image; the pointing game's are the per-class hit rates (its mean is the mean over
        classes of the per-class hit rate, its std that over classes).
        """
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for method in self.methods:
            rows = [r for r in self.records if r["method"] == method]
            per_class = [p for p in self.pointing if p["method"] == method]
            out[method] = {}
            for col in self.columns:
                values: list[Any] = [r.get(col) for r in rows]
                cls = column_metric(col)
                if cls is not None:
                    values = list(cls.summarise(col, values, per_class))
                finite = [float(v) for v in values if v is not None and math.isfinite(v)]
                if not finite:
                    out[method][col] = (math.nan, math.nan, 0)
                    continue
                std = statistics.stdev(finite) if len(finite) > 1 else math.nan
                out[method][col] = (statistics.fmean(finite), std, len(finite))
        return out

    def to_markdown(self) -> str:
        """The summary table (mean ± std; ↑ higher / ↓ lower is better; best mean in bold).

        Every mean that, as printed, equals the best one is bold (methods that tie all are).
        """
        summary = self.summary()
        head = ["method"] + [
            f"{_column_info(c)[0]} {'↑' if _column_info(c)[1] else '↓'}" for c in self.columns
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best: dict[str, float] = {}
        for col in self.columns:
            means = [summary[m][col][0] for m in self.methods if math.isfinite(summary[m][col][0])]
            if means and max(means) > min(means):  # no winner when all are equal
                best[col] = max(means) if _column_info(col)[1] else min(means)
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

    def notes(self) -> str:
        """Markdown lines on the methods left out or failed and the warnings ("" if none)."""
        lines = []
        if self.skipped:
            lines.append(
                "Left out (they do not apply to this model): "
                + "; ".join(f"{m}: {why}" for m, why in self.skipped.items())
                + "."
            )
        if self.failed:
            lines.append(
                "Failed (no numbers): " + "; ".join(f"{m}: {e}" for m, e in self.failed.items())
            )
        if self.warnings:
            shown = [
                f"{w['method']} on {w['image']}: {w['message'].splitlines()[0]}"
                for w in self.warnings
            ]
            lines.append("Warnings: " + "; ".join(shown))
        return "".join(f"\n{line}\n" for line in lines)

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
            f"Settings: {settings}.\n\n" + self.to_markdown() + self.notes(),
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
                    writer.writerow([method, col, _column_info(col)[1], _cell(mean), _cell(std), n])
        files.append(path)
        path = out / "per_image.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            rows = csv.DictWriter(f, fieldnames=["image", "method", "class", *self.columns])
            rows.writeheader()
            for r in self.records:
                rows.writerow({k: r.get(k) for k in ["image", "method", "class", *self.columns]})
        files.append(path)
        path = out / "per_image.json"
        path.write_text(
            json.dumps(
                {
                    "settings": self.settings,
                    "directions": {c: _column_info(c)[1] for c in self.columns},
                    "records": self.records,
                    "pointing": self.pointing,
                    "curves": self.curves,
                    "skipped": self.skipped,
                    "failed": self.failed,
                    "warnings": self.warnings,
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
            fig = Figure(figsize=(11, 4.2 + 0.16 * math.ceil(len(have) / 3)), layout="constrained")
            for ax, key, better in zip(
                fig.subplots(1, 2), ("deletion", "insertion"), ("lower", "higher"), strict=True
            ):
                for i, method in enumerate(have):
                    curves = self.curves[method].get(key)
                    if not curves:
                        continue
                    grid, mean = _mean_curve(curves, self.curves[method][f"{key}_fractions"])
                    area = statistics.fmean(
                        r[f"{key}_auc"]
                        for r in self.records
                        if r["method"] == method and r.get(f"{key}_auc") is not None
                    )
                    ax.plot(
                        grid.tolist(),
                        mean.tolist(),
                        label=f"{method} ({area:.3f})",
                        **line_style(i),
                    )
                ax.set_title(
                    f"{key.capitalize()} (mean over images; AUC in legend, {better} is better)",
                    fontsize=9,
                )
                ax.set_xlabel(
                    "fraction of pixels " + ("removed" if key == "deletion" else "inserted")
                )
                ax.set_ylabel("softmax probability of the class")
                ax.set_xlim(0, 1)
                _legend_below(ax, len(have))
                ax.grid(alpha=0.3)
            path = out / "deletion_insertion.png"
            fig.savefig(path, dpi=110)
            files.append(path)
        have = [m for m in self.methods if "road_morf" in self.curves.get(m, {})]
        if have:
            fig = Figure(figsize=(11, 4.2 + 0.16 * math.ceil(len(have) / 3)), layout="constrained")
            for ax, key, title in zip(
                fig.subplots(1, 2),
                ("road_morf", "road_lerf"),
                ("ROAD MoRF (lower is better)", "ROAD LeRF (higher is better)"),
                strict=True,
            ):
                for i, method in enumerate(have):
                    mean = torch.tensor(self.curves[method][key]).mean(0)
                    ax.plot(
                        self.curves[method]["road_percentiles"],
                        mean.tolist(),
                        marker="o",
                        label=method,
                        **line_style(i),
                    )
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("pixels removed and imputed (%)")
                ax.set_ylabel("change of the class probability")
                _legend_below(ax, len(have))
                ax.grid(alpha=0.3)
            path = out / "road.png"
            fig.savefig(path, dpi=110)
            files.append(path)
        return files


_DASHES: tuple[Any, ...] = ("-", "--", "-.", ":")


def line_style(index: int) -> dict[str, Any]:
    """Colour and line style of the ``index``-th curve: distinct for every index below 80.

    The colours are matplotlib's ``tab20``, its 10 dark shades first, then their light
    variants; the dash pattern cycles through solid, dashed, dash-dot and dotted, shifted by one
    every 20 curves, so no two curves of a plot share both colour and dash.
    """
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colours = [cmap(i) for i in range(20)]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {
        "color": colours[order[index % 20]],
        "linestyle": _DASHES[(index + index // 20) % len(_DASHES)],
    }


def _legend_below(ax: Any, entries: int) -> None:
    """The legend under the axes, 3 columns, so it covers no curve (none on empty axes)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=min(3, max(1, entries)),
        frameon=False,
    )


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
