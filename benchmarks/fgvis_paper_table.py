"""The FGVis paper's table (deletion AUC, RISE protocol; lower is better), rebuilt offline.

Wagner et al. (CVPR 2019), Table 1, on ImageNet validation images: FGVis against Grad-CAM,
sliding window (our ``occlusion``), LIME and RISE (the competitors' values from the RISE
paper). Here, on real data that ships with the installed packages:

* the built-in ImageNet EfficientNet-Lite0 on every natural colour photo they carry
  (scikit-image: astronaut, chelsea, coffee, rocket, motorcycle_left; scikit-learn: china,
  flower);
* the built-in VGG16 brain-MRI network on the MNI152 slices it calls "meningioma" (k = 42, 62,
  122; on a "notumor" slice deletion to black cannot lower the score: a black image is
  "notumor" at 0.99);

with **every registered method** (the registry is read at run time, so methods added later are
included; ``random`` is the uniformly random map, the sanity baseline) and FGVis' deletion game
as an extra row, and four columns per method:

* deletion AUC as in the RISE code: removed pixels set to 0 in the normalised input (the data
  mean for Lite0, black for the MRI network, whose inputs are in [0, 1]), target = top-1
  softmax probability;
* insertion AUC from RISE's own blur (``substrate="rise_gkern"``);
* ROAD ((LeRF − MoRF) / 2 over removal levels, noisy linear imputation);
* region-wise deletion AUC (16 × 16 patches ranked by the map's mean, substrate 0).

Results are cached per (model, image, method) in ``benchmarks/results/fgvis_paper_table_<model>.json``
(one file per model, so ``--models lite0`` and ``--models vgg16`` may run at once; an entry made
with other settings counts as missing), so a re-run computes only what is missing. Writes ``fgvis_paper_table.md`` and ``fgvis_paper_table.png`` next to it.

Run from the repository root::

    nice -n 10 python benchmarks/fgvis_paper_table.py            # the full table
    python benchmarks/fgvis_paper_table.py --quick                # fast settings, own cache
    python benchmarks/fgvis_paper_table.py --methods gradcam,random --force
    python benchmarks/fgvis_paper_table.py --report               # tables from the cache only
    nice -n 10 python benchmarks/fgvis_paper_table.py --protocol paper --models lite0

``--protocol paper`` scores the paper's rows alone (its five methods, FGVis' deletion game and
the random map) on Lite0 with the protocol the paper reports: RISE's curves of 224 steps (224
pixels each), RISE with 4000 masks, LIME with 1000 samples, FGVis with 300 iterations. It has its
own cache and writes ``fgvis_paper_table_protocol.md``; the paper's insertion AUCs (RISE
paper) are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import evidencemap as em
from evidencemap import metrics as M
from evidencemap.evaluation import QUICK_METHOD_OPTIONS
from evidencemap.methods.registry import unsupported_reason

RESULTS = Path(__file__).parent / "results"
DOCS_FIGURE = Path(__file__).parents[1] / "docs" / "images" / "fgvis_paper_table.png"

PAPER: dict[str, dict[str, float]] = {
    "ResNet-50": {"fgvis": 0.0644, "gradcam": 0.1232, "occlusion": 0.1421, "lime": 0.1217,
                  "rise": 0.1076},
    "VGG16": {"fgvis": 0.0636, "gradcam": 0.1087, "occlusion": 0.1158, "lime": 0.1014,
              "rise": 0.0980},
}  # fmt: skip
"""Deletion AUC of the FGVis paper's Table 1 (ImageNet validation), by our method names
(sliding window = ``occlusion``)."""

PAPER_INSERTION: dict[str, dict[str, float]] = {
    "ResNet-50": {"gradcam": 0.6766, "occlusion": 0.5618, "lime": 0.6940, "rise": 0.7267},
    "VGG16": {"gradcam": 0.6149, "occlusion": 0.5619, "lime": 0.6167, "rise": 0.7226},
}
"""Insertion AUC of the RISE paper (the FGVis paper reports deletion only)."""

PROTOCOLS = ("table", "quick", "paper")
"""``table``: every method, reduced curves and caps; ``quick``: development settings;
``paper``: the paper's rows on Lite0 at the paper's protocol (:data:`PAPER_OPTIONS`)."""

PAPER_ROWS = ("random", "fgvis", "fgvis_delete", "gradcam", "occlusion", "lime", "rise")
"""The rows of ``--protocol paper``."""

PAPER_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 4000},
    "lime": {"samples": 1000},
    "fgvis": {"max_iterations": 300},
}
"""The paper's settings (RISE paper: N = 4000 masks for ResNet-50; LIME's default 1000
samples; FGVis 300 iterations); occlusion at its defaults (window 32, stride 16: the papers do
not give theirs) and Grad-CAM at its default layer."""

CORE = ("random", "fgvis", "gradcam", "occlusion", "lime", "rise")
"""Computed first for every model: the paper's five rows and the baseline."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"fgvis_delete": ("fgvis", {"game": "delete"})}
"""Extra rows: row name → (registered method, options)."""

METRICS = ("deletion", "insertion", "road", "region_deletion")
LOWER_IS_BETTER = {"deletion": True, "insertion": False, "road": False, "region_deletion": True}
TITLES = {
    "deletion": "deletion AUC ↓",
    "insertion": "insertion AUC ↑",
    "road": "ROAD ↑",
    "region_deletion": "region deletion AUC ↓",
}

TABLE_OPTIONS: dict[str, dict[str, Any]] = {
    **QUICK_METHOD_OPTIONS,
    "ablationcam": {"top_k": 32},
    "smoothgrad_sq": {"samples": 8},
    "vargrad": {"samples": 8},
}
"""Caps on the costly methods on Lite0 (the evaluation's quick options: RISE 500 masks, LIME
and KernelSHAP 200 samples, Score-CAM 32 channels, FGVis 40 iterations, …); the rest run with
their defaults (occlusion: window 32, stride 16)."""

MRI_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 100},
    "lime": {"samples": 50},
    "kernel_shap": {"samples": 50},
    "occlusion": {"window": 60, "stride": 30},
    "fgvis": {"max_iterations": 20},
    "scorecam": {"top_k": 8},
    "ablationcam": {"top_k": 8},
    "sscam": {"top_k": 4, "samples": 2},
    "iscam": {"top_k": 4, "samples": 2},
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 4},
    "smoothgrad_sq": {"samples": 4},
    "vargrad": {"samples": 4},
}
"""Tighter caps on VGG16 (several times Lite0's time per forward pass on this CPU)."""

QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 100},
    "lime": {"samples": 50},
    "kernel_shap": {"samples": 50},
    "fgvis": {"max_iterations": 10},
    "occlusion": {"window": 64, "stride": 32},
}
"""``--quick``: development settings."""


@dataclass(frozen=True)
class Settings:
    """The protocol of one model's table (part of every cache entry's key).

    Attributes:
        deletion_steps / insertion_steps: steps of the curves (RISE: 224, one row of a 224 × 224
            image per step; fewer steps sample the same curve more coarsely).
        road_percentiles: ROAD's removal levels.
        region_patch / region_steps: region deletion's patch side and steps.
        method_options: method (or variant row) → options.
        batch_size: perturbed inputs per forward pass.
    """

    deletion_steps: int
    insertion_steps: int
    road_percentiles: tuple[int, ...]
    region_patch: int
    region_steps: int | None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 32

    @classmethod
    def make(cls, *, quick: bool = False, model: str = "lite0", protocol: str = "") -> Settings:
        """The settings of ``model`` (``"lite0"`` or ``"vgg16"``) under ``protocol`` (one of
        :data:`PROTOCOLS`; ``quick=True`` is ``"quick"``)."""
        protocol = protocol or ("quick" if quick else "table")
        if protocol == "paper":
            if model != "lite0":
                raise ValueError(f"--protocol paper runs on lite0 only, got model {model!r}")
            return cls(224, 224, (50,), 16, 7, {k: dict(v) for k, v in PAPER_OPTIONS.items()})
        options = {k: dict(v) for k, v in TABLE_OPTIONS.items()}
        if model == "vgg16":
            options.update({k: dict(v) for k, v in MRI_OPTIONS.items()})
        if protocol == "quick":
            options.update({k: dict(v) for k, v in QUICK_OPTIONS.items()})
            return cls(8, 8, (50,), 8, 8, options)
        if model == "vgg16":
            return cls(16, 8, (50,), 30, 8, options)
        return cls(28, 14, (50,), 16, 7, options)

    def options_for(self, row: str) -> tuple[str, dict[str, Any]]:
        """``(registered method, options)`` of a table row, only the options it takes."""
        method, extra = VARIANTS.get(row, (row, {}))
        spec = em.describe(method)
        taken = set(spec.options)
        if spec.forwards_to:
            taken |= set(em.describe(spec.options[spec.forwards_to].default).options)
        options = {k: v for k, v in self.method_options.get(method, {}).items() if k in taken}
        return method, {**options, **extra}

    def key(self, row: str) -> str:
        """What an entry of ``row`` was computed with (a stale entry is recomputed)."""
        method, options = self.options_for(row)
        protocol = {
            "deletion_steps": self.deletion_steps,
            "insertion_steps": self.insertion_steps,
            "road_percentiles": list(self.road_percentiles),
            "region": [self.region_patch, self.region_steps],
            "method": method,
            "options": options,
        }
        return json.dumps(protocol, sort_keys=True, default=str)

    def describe(self) -> str:
        """One line for the table's header."""
        region = f"{self.region_patch}×{self.region_patch} patches" + (
            f", {self.region_steps} steps" if self.region_steps else ", one patch per step"
        )
        return (
            f"deletion {self.deletion_steps} steps (substrate 0), insertion "
            f"{self.insertion_steps} steps (substrate `rise_gkern`), ROAD at "
            f"{', '.join(map(str, self.road_percentiles))} %, region deletion {region}"
        )


class Cache:
    """The JSON cache ``{model: {image: {row: entry}}}``, written after every entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, model: str, image: str, row: str, key: str) -> dict[str, Any] | None:
        entry = self.data.get(model, {}).get(image, {}).get(row)
        return entry if entry is not None and entry.get("key") == key else None

    def put(self, model: str, image: str, row: str, entry: dict[str, Any]) -> None:
        self.data.setdefault(model, {}).setdefault(image, {})[row] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def explain_all(
    model: nn.Module, names: Sequence[str], xs: Tensor, row: str, settings: Settings
) -> tuple[Tensor, Tensor, Tensor, float, dict[str, Any]]:
    """``(maps, targets, scores, seconds per image, options)`` of one row on the inputs ``xs``
    ``(n, C, *S)``, explained in one batched call (FGVis optimises the batch at once); the
    random map is drawn per image, seeded by the image's name."""
    method, options = settings.options_for(row)
    start = time.perf_counter()
    if method == "random":
        parts = [
            em.explain(model, xs[i : i + 1], method, **options, seed=zlib.crc32(n.encode()))
            for i, n in enumerate(names)
        ]
        maps = torch.cat([p.maps for p in parts])
        targets = torch.cat([p.targets for p in parts])
        scores = torch.cat([p.scores for p in parts])
    else:
        exp = em.explain(model, xs, method, **options)
        maps, targets, scores = exp.maps, exp.targets, exp.scores
    return maps, targets, scores, (time.perf_counter() - start) / len(names), options


def score_maps(
    model: nn.Module, x: Tensor, maps: Tensor, target: Tensor, settings: Settings
) -> dict[str, float]:
    """The four numbers of one map ``(1, 1, *S)`` of the input ``x`` ``(1, C, *S)``."""
    b = settings.batch_size
    deletion = M.Deletion(model, steps=settings.deletion_steps, substrate="zero", batch_size=b)
    insertion = M.Insertion(
        model, steps=settings.insertion_steps, substrate="rise_gkern", batch_size=b
    )
    road = M.ROAD(model, percentiles=list(settings.road_percentiles), batch_size=b)
    region = M.RegionDeletion(
        model, patch=settings.region_patch, steps=settings.region_steps, batch_size=b
    )
    return {
        "deletion": float(deletion(x, maps, target).auc[0]),
        "insertion": float(insertion(x, maps, target).auc[0]),
        "road": float(road(x, maps, target).combined[0]),
        "region_deletion": float(region(x, maps, target).auc[0]),
    }


def score_model(
    cache: Cache,
    name: str,
    model: nn.Module,
    images: Sequence[tuple[str, Tensor]],
    rows: Sequence[str],
    settings: Settings,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> int:
    """Compute every missing (image, row) of ``name`` into ``cache``; return how many ran.

    Per row, the images it lacks are explained in one batched call, then scored one by one
    (each saved at once). A row that fails is recorded with its error (listed under the table;
    retried by the next run) and the others go on.
    """
    done = 0
    for row in rows:
        key = settings.key(row)
        todo = []
        for image, x in images:
            cached = cache.get(name, image, row, key)
            if force or cached is None or "error" in cached:  # a failed entry is retried
                todo.append((image, x))
        if not todo:
            continue
        names = [image for image, _ in todo]
        xs = torch.stack([x for _, x in todo])
        start = time.perf_counter()
        try:
            maps, targets, scores, seconds, options = explain_all(model, names, xs, row, settings)
        except Exception as error:
            for image in names:
                cache.put(
                    name, image, row, {"error": f"{type(error).__name__}: {error}", "key": key}
                )
            done += len(names)
            continue
        if log is not None:
            log(f"{name} {row}: maps of {len(names)} images {time.perf_counter() - start:.1f} s")
        for i, image in enumerate(names):
            start = time.perf_counter()
            try:
                entry: dict[str, Any] = score_maps(
                    model, xs[i : i + 1], maps[i : i + 1], targets[i : i + 1], settings
                )
            except Exception as error:
                entry = {"error": f"{type(error).__name__}: {error}"}
            entry.update(
                seconds=seconds,
                target=int(targets[i]),
                score=float(scores[i]),
                options={
                    k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))
                },
                key=key,
            )
            cache.put(name, image, row, entry)
            done += 1
            if log is not None:
                log(f"{name} {image} {row}: {time.perf_counter() - start:.1f} s")
    return done


def summarise(
    per_image: dict[str, dict[str, Any]], rows: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """row → metric (and ``seconds``) → ``{"mean", "std", "n"}`` over the images."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        entries = [e[row] for e in per_image.values() if row in e and "error" not in e[row]]
        out[row] = {}
        for column in (*METRICS, "seconds"):
            values = np.array([e[column] for e in entries], dtype=float)
            out[row][column] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "n": len(values),
            }
    return out


def ranks(summary: dict[str, dict[str, dict[str, float]]], metric: str) -> dict[str, int]:
    """row → rank (1 = best) of its mean on ``metric``; rows without a value are left out."""
    scored = [(r, s[metric]["mean"]) for r, s in summary.items() if s[metric]["n"]]
    scored.sort(key=lambda rv: rv[1] if LOWER_IS_BETTER[metric] else -rv[1])
    return {r: i + 1 for i, (r, _) in enumerate(scored)}


def _cell(stat: dict[str, float], rank: int | None) -> str:
    if not stat["n"]:
        return "—"
    std = f" ± {stat['std']:.3f}" if not math.isnan(stat["std"]) else ""
    return f"{stat['mean']:.3f}{std} ({rank})"


def markdown_table(
    title: str,
    summary: dict[str, dict[str, dict[str, float]]],
    paper: dict[str, dict] | None,
    paper_insertion: dict[str, dict] | None = None,
) -> str:
    """The table of one model: rows by deletion AUC, each metric's mean ± std (rank); the
    paper's deletion (and, given ``paper_insertion``, insertion) AUCs beside ours."""
    order = ranks(summary, "deletion")
    rank_of = {m: ranks(summary, m) for m in METRICS}
    rows = sorted(summary, key=lambda r: order.get(r, len(order) + 1))
    # rows not computed yet are listed under the table, but the paper's own are kept
    rows = [r for r in rows if summary[r]["deletion"]["n"] or any(r in p for p in PAPER.values())]
    papers = list(paper or {})
    head = ["method", TITLES["deletion"], *[f"paper {p}" for p in papers]]
    head += [TITLES["insertion"]]
    head += [f"paper insertion {p}" for p in paper_insertion or {}]
    head += [TITLES[m] for m in METRICS[2:]] + ["s / map", "images"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = summary[row]
        cells = [f"**{row}**" if row == "random" else row, _cell(s["deletion"], order.get(row))]
        cells += [f"{paper[p][row]:.4f}" if paper and row in paper[p] else "" for p in papers]
        cells += [_cell(s["insertion"], rank_of["insertion"].get(row))]
        cells += [
            f"{paper_insertion[p][row]:.4f}" if row in paper_insertion[p] else ""
            for p in paper_insertion or {}
        ]
        cells += [_cell(s[m], rank_of[m].get(row)) for m in METRICS[2:]]
        seconds = s["seconds"]
        cells += [f"{seconds['mean']:.2f}" if seconds["n"] else "—", str(s["deletion"]["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spearman_between_metrics(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """How much the metrics agree: Spearman correlation of the rows' ranks, metric by metric."""
    rank_of = {m: ranks(summary, m) for m in METRICS}
    common = sorted(set.intersection(*(set(r) for r in rank_of.values())))
    lines = ["| | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for a in METRICS:
        cells = []
        for b in METRICS:
            ra = np.array([rank_of[a][r] for r in common], dtype=float)
            rb = np.array([rank_of[b][r] for r in common], dtype=float)
            rho = np.corrcoef(ra.argsort().argsort(), rb.argsort().argsort())[0, 1]
            cells.append(f"{rho:+.2f}" if len(common) > 2 else "—")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def refused_everywhere(
    cache: Cache, name: str, images: Sequence[str], rows: Sequence[str], settings: Settings
) -> dict[str, str]:
    """Rows that failed on every image with one and the same ``ValueError`` (the method refuses
    the model, e.g. CAM without a global-average-pooling head): row → the method's message.
    They do not apply, like the rows :func:`table_rows` leaves out."""
    out = {}
    for row in rows:
        entries = [cache.get(name, i, row, settings.key(row)) for i in images]
        errors = {e.get("error") for e in entries if e is not None}
        if (
            images
            and all(e is not None and "error" in e for e in entries)
            and len(errors) == 1
            and str(next(iter(errors))).startswith("ValueError: ")
        ):
            out[row] = str(next(iter(errors)))[len("ValueError: ") :]
    return out


def missing_cells(
    cache: Cache, name: str, images: Sequence[str], rows: Sequence[str], settings: Settings
) -> list[str]:
    """``image/row`` pairs without a current entry, and the rows that failed (with why)."""
    out = []
    for row in rows:
        absent = [i for i in images if cache.get(name, i, row, settings.key(row)) is None]
        failed = [
            f"{i}/{row} failed: {entry['error'][:120]}"
            for i in images
            if (entry := cache.get(name, i, row, settings.key(row))) is not None
            and "error" in entry
        ]
        if len(absent) == len(images):
            out.append(f"{row} (all images)")
        else:
            out += [f"{i}/{row}" for i in absent]
        out += failed
    return out


def figure(summaries: dict[str, dict[str, dict[str, dict[str, float]]]], path: Path) -> None:
    """Deletion vs insertion and pixel vs region deletion, one point per method, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 2, figsize=(13, 6 * len(summaries)), squeeze=False)
    for (title, summary), (left, right) in zip(summaries.items(), axes, strict=True):
        for ax, (mx, my) in (
            (left, ("deletion", "insertion")),
            (right, ("deletion", "region_deletion")),
        ):
            for row, s in summary.items():
                if not (s[mx]["n"] and s[my]["n"]):
                    continue
                paper_row = row in PAPER["VGG16"]
                colour = "crimson" if row == "random" else ("tab:blue" if paper_row else "grey")
                ax.scatter(s[mx]["mean"], s[my]["mean"], color=colour, s=40 if paper_row else 18)
                ax.annotate(
                    row,
                    (s[mx]["mean"], s[my]["mean"]),
                    fontsize=7,
                    xytext=(3, 2),
                    textcoords="offset points",
                    color=colour,
                )
            ax.set_xlabel(f"{TITLES[mx]} (pixels, substrate 0)")
            ax.set_ylabel(TITLES[my])
            ax.set_title(title)
            ax.grid(alpha=0.3)
    fig.suptitle("FGVis paper table rebuilt: red = random map, blue = the paper's five methods")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # fmt: skip


# --------------------------------------------------------------------------- data


def lite0_photos(model: Any) -> list[tuple[str, Tensor]]:
    """Every natural colour photo of scikit-image's and scikit-learn's data, preprocessed."""
    from skimage import data

    photos = [(n, getattr(data, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    photos.append(("motorcycle_left", data.stereo_motorcycle()[0]))
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:  # scikit-learn not installed: its two photos are left out
        pass
    else:
        photos += [(n, load_sample_image(f"{n}.jpg")) for n in ("china", "flower")]
    return [(name, model.preprocess(img)) for name, img in photos]


MRI_SLICES = (42, 62, 122)
"""The MNI152 axial slices the VGG16 network calls "meningioma" (z = −30, −10, +50 mm)."""


def mri_slices() -> list[tuple[str, Tensor]]:
    from evidencemap.models.vgg16_mri import mni152_slices

    x = mni152_slices(list(MRI_SLICES)).contiguous()
    return [(f"mni152_k{k}", x[i]) for i, k in enumerate(MRI_SLICES)]


def predictions(model: Any, images: Sequence[tuple[str, Tensor]]) -> str:
    """``name (label p)`` of each image: the class every row explains and its probability."""
    with torch.no_grad():
        probs = model.predict(torch.stack([x for _, x in images]))
    top = probs.max(1)
    return ", ".join(
        f"{name} ({model.labels[int(c)]} {float(p):.2f})"
        for (name, _), p, c in zip(images, top.values, top.indices, strict=True)
    )


def table_rows(
    model: nn.Module, only: Sequence[str] | None, protocol: str = "table"
) -> tuple[list[str], dict[str, str]]:
    """``(rows in computing order, left out → why)``: the core rows first, every registered
    method that applies, then the variants (all restricted to ``only`` when given; under the
    ``paper`` protocol, :data:`PAPER_ROWS` only)."""
    rows, skipped = [], {}
    names = PAPER_ROWS if protocol == "paper" else [*CORE, *em.methods(), *VARIANTS]
    for name in names:
        if name in rows or (only and name not in only):
            continue
        method = VARIANTS.get(name, (name, {}))[0]
        why = unsupported_reason(method, model)
        if why is None:
            rows.append(name)
        else:
            skipped[name] = why
    return rows, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="development settings, own files")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="table (default), quick (= --quick) or paper (the paper's rows and protocol, lite0)",
    )
    parser.add_argument("--methods", help="comma-separated rows to compute (default: all)")
    parser.add_argument("--models", default="lite0,vgg16", help="lite0, vgg16 or both")
    parser.add_argument("--force", action="store_true", help="recompute cached entries")
    parser.add_argument("--report", action="store_true", help="write the tables from the cache")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = args.protocol or ("quick" if args.quick else "table")
    if protocol == "paper" and args.models != "lite0":
        parser.error("--protocol paper runs on lite0 only: add --models lite0")
    stem = {"table": "fgvis_paper_table", "quick": "fgvis_paper_table_quick"}.get(
        protocol, "fgvis_paper_table_protocol"
    )
    only = args.methods.split(",") if args.methods else None
    start, load = time.perf_counter(), os.getloadavg()
    loaded = _load_models(args.models.split(","))
    # one file per model, so that the two models may run in two processes at once
    caches = {key: Cache(RESULTS / f"{stem}_{key}.json") for key in loaded}
    # the paper's rows and the baseline first on every model, then the other rows
    for phase in ("core", "rest"):
        for key, (_, model, images) in loaded.items():
            settings = Settings.make(model=key, protocol=protocol)
            rows, _ = table_rows(model, only, protocol)
            rows = [r for r in rows if (r in CORE) == (phase == "core")]
            if not args.report:
                score_model(
                    caches[key], key, model, images, rows, settings, force=args.force,
                    log=lambda line: print(line, file=sys.stderr, flush=True),
                )  # fmt: skip
    elapsed = time.perf_counter() - start
    text = _report(caches, loaded, protocol, elapsed, load)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


def _load_models(keys: Sequence[str]) -> dict[str, tuple[str, nn.Module, list]]:
    from evidencemap import models

    loaded: dict[str, tuple[str, nn.Module, list]] = {}
    if "lite0" in keys:
        lite0 = models.load("efficientnet-lite0")
        loaded["lite0"] = ("EfficientNet-Lite0 (ImageNet), real photos", lite0, lite0_photos(lite0))
    if "vgg16" in keys:
        vgg = models.load("vgg16-brain-mri")
        loaded["vgg16"] = ("VGG16 brain MRI, MNI152 slices", vgg, mri_slices())
    return loaded


def _report(
    caches: dict[str, Cache], loaded: dict[str, tuple[str, nn.Module, list]], protocol: str,
    elapsed: float, load: tuple[float, float, float],
) -> str:  # fmt: skip
    flag = {"table": "", "quick": " --quick", "paper": " --protocol paper --models lite0"}
    parts = [
        "# The FGVis paper's table, rebuilt on the built-in networks"
        + (" (the paper's rows and protocol)" if protocol == "paper" else "")
        + "\n",
        f"`python benchmarks/fgvis_paper_table.py{flag[protocol]}` — torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; this "
        f"invocation {elapsed / 60:.1f} min (cached entries not recomputed), load average at "
        f"start {tuple(round(v, 2) for v in load)}. Paper: Wagner et al. (CVPR 2019), Table 1, "
        "ImageNet validation images, deletion AUC (RISE protocol), lower is better; sliding "
        "window = `occlusion`. Every cell: mean ± std over images (rank among the rows). "
        "`random` is a uniformly random map (one draw per image); `fgvis_delete` is FGVis' "
        "deletion game (its map: the evidence it deletes).\n",
    ]
    summaries = {}
    for key, (title, model, images) in loaded.items():
        settings = Settings.make(model=key, protocol=protocol)
        rows, skipped = table_rows(model, None, protocol)
        cache = caches[key]
        refused = refused_everywhere(cache, key, [n for n, _ in images], rows, settings)
        skipped.update(refused)
        rows = [r for r in rows if r not in refused]
        per_image = cache.data.get(key, {})
        current = {
            img: {r: e for r, e in rows_.items() if cache.get(key, img, r, settings.key(r))}
            for img, rows_ in per_image.items()
        }
        summary = summarise(current, rows)
        summaries[title] = summary
        caps = ", ".join(
            f"{r} {settings.options_for(r)[1]}" for r in rows if settings.options_for(r)[1]
        )
        parts.append(
            markdown_table(title, summary, PAPER, PAPER_INSERTION if protocol == "paper" else None)
        )
        parts.append(
            f"\nImages (top-1 class, probability): {predictions(model, images)}. "
            f"Metrics: {settings.describe()}. "
            f"Method settings: {caps}; every other method at its defaults. Left out (they do "
            "not apply): "
            f"{', '.join(f'{k} ({v})' for k, v in skipped.items()) or 'none'}.\n"
        )
        parts.append("Agreement of the metrics (Spearman correlation of the rows' ranks):\n")
        parts.append(spearman_between_metrics(summary))
        missing = missing_cells(cache, key, [n for n, _ in images], rows, settings)
        parts.append(
            f"\nMissing cells: {', '.join(missing)}\n" if missing else "\nNo cell missing.\n"
        )
    png = (
        RESULTS
        / {
            "table": "fgvis_paper_table.png",
            "quick": "fgvis_paper_table_quick.png",
            "paper": "fgvis_paper_table_protocol.png",
        }[protocol]
    )
    figure(summaries, png)
    if protocol == "table":  # the docs show it too
        shutil.copyfile(png, DOCS_FIGURE)
    parts.append(f"\n![deletion vs insertion and region deletion per method]({png.name})\n")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
