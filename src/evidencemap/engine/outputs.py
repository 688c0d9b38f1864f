"""What is written per input: output names (:func:`output_stem`, :func:`output_bases`), the
request a manifest records and the resume decision (:func:`request_of`, :func:`already_done`),
pictures (:func:`evidencemap.viz.figure`: signed maps on a diverging symmetric scale), the
``.npz`` of the one maps schema, NIfTI maps and the manifest, written last."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from evidencemap import io, viz
from evidencemap.engine.items import Item, crop_region
from evidencemap.engine.predictions import is_embedding
from evidencemap.engine.settings import Settings
from evidencemap.explanation import Explanation
from evidencemap.models.loading import LoadedModel

__all__ = [
    "Result",
    "already_done",
    "output_bases",
    "output_stem",
    "request_of",
    "strip_suffix",
    "versions",
]


def versions() -> dict[str, str]:
    """Versions of evidencemap, torch and Python (written into every manifest)."""
    import evidencemap

    return {
        "evidencemap": evidencemap.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def strip_suffix(path: Path) -> str:
    """The file name without its suffix (both parts of ``.nii.gz``)."""
    name = path.name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return path.stem if path.suffix else name


def output_bases(paths: Sequence[Path], out: Path, root: Path | None = None) -> list[Path]:
    """Output bases for ``paths``: ``out/REL/STEM``, REL relative to ``root`` (batch) or empty.

    When two inputs would share a base (``cat.jpg`` and ``cat.png``), the later ones in the given
    order keep their suffix: ``cat_png``.
    """
    bases: list[Path] = []
    taken: set[Path] = set()
    for path in paths:
        folder = out
        if root is not None:
            folder = out / path.relative_to(root).parent
        base = folder / strip_suffix(path)
        if base in taken:
            base = folder / path.name.replace(".", "_")
        taken.add(base)
        bases.append(base)
    return bases


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples → lists, other objects → their repr)."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _non_default_options(settings: Settings) -> dict[str, Any]:
    """The options asked for whose values differ from the method's defaults."""
    from evidencemap.methods import describe

    known = describe(settings.method_name).options
    return {
        name: value
        for name, value in sorted(settings.options.items())
        if name not in known or _jsonable(value) != _jsonable(known[name].default)
    }


def _variant(settings: Settings) -> dict[str, Any]:
    """What, besides the target, makes a result differ from the defaults' (for its name)."""
    parts = {
        "options": _non_default_options(settings),
        "layer": settings.layer,
        "frame": settings.frame,
        "window": settings.window,
    }
    return _jsonable({k: v for k, v in parts.items() if v not in (None, {}, "")})


def output_stem(base: Path, settings: Settings) -> Path:
    """``base`` + ``_METHOD``, then ``_topK`` with ``top_k``, ``_t<target>`` for a target other
    than the top class and
    ``_o<6 hex digits>`` (a SHA-1 of the non-default options, layer, frame and window, as JSON)
    when those are not the defaults: ``chelsea_gradcam``, ``chelsea_gradcam_t281``,
    ``chelsea_gradcam_t281_o3fa9c1``. The manifest says what the suffixes stand for."""
    name = f"{base.name}_{settings.method_name}"
    if settings.top_k is not None:
        name += f"_top{settings.top_k}"
    if settings.target_name is not None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", settings.target_name).strip("-")[:32]
        name += f"_t{slug}"
    variant = _variant(settings)
    if variant:
        digest = hashlib.sha1(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:6]
        name += f"_o{digest}"
    return base.with_name(name)


def _input_size(loaded: LoadedModel) -> Any:
    """The model input's size: the volume size ``(D, H, W)`` or the photo crop's side."""
    if loaded.input_size is not None:
        return loaded.input_size
    return getattr(loaded.preprocess, "size", None)


def request_of(settings: Settings, loaded: LoadedModel) -> dict[str, Any]:
    """What was asked, as the manifest's ``request`` records it (JSON values)."""
    return _jsonable(
        {
            "model": loaded.name,
            "input_size": _input_size(loaded),
            "method": settings.method_name,
            "target": settings.target_name,
            "top_k": settings.top_k,
            "picture": {
                "format": settings.format,
                "bare": settings.bare,
                "dpi": settings.dpi,
                "figsize": settings.figsize,
            },
            **{"options": {}, "layer": None, "frame": None, "window": None},
            **_variant(settings),
        }
    )


def already_done(base: Path, settings: Settings, loaded: LoadedModel) -> bool:
    """Whether the manifest of ``base`` exists and records this very request (model, method,
    target, top_k, options, layer, frame, window, picture settings): what a resumed ``batch``
    skips."""
    path = output_stem(base, settings)
    manifest = path.with_name(path.name + ".json")
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("request")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(recorded == request_of(settings, loaded))


@dataclass
class Result:
    """What was written for one input: its manifest, pictures, the top class (``predicted``,
    ``None`` without class outputs), the explained targets (``label``, ``probability`` or
    ``None``, ``score``, ``class``) and the warnings."""

    item: Item
    manifest: Path
    pictures: list[Path]
    predicted: dict[str, Any] | None
    warnings: tuple[str, ...] = ()
    targets: list[dict[str, Any]] = field(default_factory=list)


def _title(method: str, target: dict[str, Any]) -> str:
    if target.get("probability") is not None:
        return f"{method} — {target['label']} {target['probability']:.2f}"
    return f"{method} — {target['label']} (score {target['score']:.3g})"


def _figure(
    item: Item,
    loaded: LoadedModel,
    settings: Settings,
    explanation: Explanation,
    row: int,
    title: str,
) -> Figure:
    """The figure of map ``row`` of ``explanation`` for ``item``: :func:`viz.figure
    <evidencemap.viz.figure>` on the original photo (crop outlined; FGVis' explanation image
    beside) or the volume (slices through the peak), coloured as it decides — signed maps
    (:func:`viz.is_signed <evidencemap.viz.is_signed>`) with a diverging colour map on a
    symmetric scale, the others on [0, 1] — unless ``settings.cmap`` names the colour map."""
    if item.kind == "volume":
        if item.volume is None:
            raise ValueError(f"{item.path}: a volume item without its volume")
        image: Any = item.volume[0]
    elif loaded.preprocess is None or item.photo is None:
        raise ValueError(f"{item.path}: a photo needs the photo and an image model")
    else:
        image = item.photo
    return viz.figure(
        explanation,
        image,
        index=row,
        model=loaded if loaded.preprocess is not None else None,
        cmap=settings.cmap,
        alpha=settings.opacity,
        title=title,
        spacing=item.meta.get("spacing") if item.kind == "volume" else None,
        dpi=settings.dpi,
        figsize=settings.figsize,
    )


def _save_picture(
    item: Item,
    loaded: LoadedModel,
    settings: Settings,
    explanation: Explanation,
    row: int,
    path: Path,
    figure: Callable[[], Figure],
) -> Path:
    """Write the picture of map ``row`` to ``path`` + the format's suffix: the ``figure`` or,
    with ``settings.bare``, the map alone (``path`` + ``_bare`` + the suffix): over the photo
    as PNG (coloured as in the figure, :func:`viz.look <evidencemap.viz.look>`), or the
    method's map (``explanation.maps[row]``) as 16-bit TIFF."""
    bare = "_bare" if settings.bare else ""
    target = path.with_name(f"{path.name}{bare}.{settings.format}")
    if not settings.bare and settings.format == "png":  # RGB, rendered at the figure's dpi
        return viz.save_png(viz.render(figure()), target)
    if not settings.bare:
        return viz.save_figure(figure(), target, settings.format, settings.dpi)
    if settings.format == "tiff" or item.kind == "volume":
        return viz.save_map(explanation.maps[row], target, format="tiff")
    pre = loaded.preprocess
    if pre is None or item.photo is None:
        raise ValueError(f"{item.path}: a photo needs the photo and an image model")
    look = viz.look(explanation, row, cmap=settings.cmap)
    width, height = item.photo.size
    on_photo = pre.to_original(look.heat[None].float(), width, height)[0]
    low, high = look.scale if look.scale is not None else (None, None)
    region = crop_region(loaded, width, height)
    return viz.save_map(
        on_photo if look.signed else on_photo.clamp(0, 1),
        target,
        image=item.photo,
        cmap=look.cmap,
        alpha=settings.opacity,
        region=region,
        vmin=low,
        vmax=high,
        format="png",
    )


def _save_json_atomic(path: Path, obj: Any) -> Path:
    temporary = path.with_name(path.name + ".partial")
    io.save_json(temporary, obj)
    os.replace(temporary, path)
    return path


@dataclass
class _Batch:
    """One call of the method on stacked items, and what every item's files share."""

    explanation: Explanation
    k: int
    seconds: float
    device: torch.device
    predictions: list[list[dict[str, Any]]]
    probs: Tensor | None
    warnings: list[str]


def _target_record(
    batch: _Batch, row: int, loaded: LoadedModel, settings: Settings
) -> dict[str, Any]:
    """What the manifest says about the target of ``row`` (its class, label, probability)."""
    explanation = batch.explanation
    cls = None if explanation.targets is None else int(explanation.targets[row])
    if cls is not None and not is_embedding(loaded):
        label = loaded.label(cls)
    else:
        # an embedding's default target is its norm (see _resolve_target)
        label = settings.target_name or ("norm" if is_embedding(loaded) else "custom target")
    probs = batch.probs
    return {
        "class": cls if not is_embedding(loaded) else None,
        "label": label,
        "probability": None if probs is None or cls is None else float(probs[row, cls]),
        "score": float(explanation.scores[row]),
    }


def _record_beside(
    explanation: Explanation, row: int, item: Item, loaded: LoadedModel, target: dict[str, Any]
) -> None:
    """Record in ``target`` the explanation image the figure shows beside map ``row`` (FGVis)
    and the model's score and top class on it."""
    shown_image = explanation.explanation_image(row)
    if shown_image is None or shown_image.image.ndim != item.tensor.ndim:
        return
    target["shown_beside"] = shown_image.kind
    if shown_image.score is not None:
        # the explanation is a model input: the model's score on it is reported
        # (deletion game: on the image with the evidence removed)
        target["explanation_score"] = shown_image.score
    if shown_image.top1 is not None:
        target["explanation_top1"] = {
            "class": shown_image.top1,
            "label": loaded.label(shown_image.top1),
        }


def _write_pictures(
    item: Item, rows: range, batch: _Batch, loaded: LoadedModel, settings: Settings, stem: Path
) -> tuple[list[dict[str, Any]], list[Path]]:
    """One PNG per map of ``item`` (``rows`` of the batch); the target records and paths."""
    chosen: list[dict[str, Any]] = []
    pictures: list[Path] = []
    for rank, row in enumerate(rows, start=1):
        target = _target_record(batch, row, loaded, settings)
        suffix = f"_{rank}" if settings.top_k is not None else ""
        _record_beside(batch.explanation, row, item, loaded, target)
        title = _title(batch.explanation.label, target)
        picture = _save_picture(
            item,
            loaded,
            settings,
            batch.explanation,
            row,
            stem.with_name(f"{stem.name}{suffix}"),
            lambda: _figure(item, loaded, settings, batch.explanation, row, title),  # noqa: B023
        )
        target["picture"] = str(picture)
        chosen.append(target)
        pictures.append(picture)
    return chosen, pictures


def _write_maps(explanation: Explanation, rows: range, stem: Path) -> Path:
    """The ``.npz`` of ``rows`` in the one schema (:func:`evidencemap.io.save_explanation`:
    ``maps``, ``scores``, ``raw`` / ``raw_J`` per layer, ``targets``, method, label, layers,
    options; read it back with :func:`evidencemap.io.load_maps`)."""
    written = io.save_explanation(
        stem.with_name(stem.name + ".npz"), explanation, slice(rows.start, rows.stop)
    )
    if written is None:  # only for file objects
        raise ValueError(f"{stem}.npz was not written")
    return written


def _write_nifti(item: Item, rows: range, explanation: Explanation, stem: Path) -> list[Path]:
    """The maps of a volume with an affine (NIfTI, DICOM) as NIfTI on the input's grid
    (:func:`evidencemap.io.save_nifti`): ``STEM.nii.gz`` (``STEM_1.nii.gz`` … with top_k), to
    open over the scan in ITK-SNAP, 3D Slicer or FSLeyes."""
    affine = item.meta.get("affine")
    if item.kind != "volume" or affine is None or item.volume is None:
        return []
    shape = (int(item.volume.shape[1]), int(item.volume.shape[2]), int(item.volume.shape[3]))
    written = []
    for rank, row in enumerate(rows, start=1):
        suffix = f"_{rank}" if len(rows) > 1 else ""
        path = stem.with_name(f"{stem.name}{suffix}.nii.gz")
        written.append(io.save_nifti(path, explanation.maps[row], affine, shape=shape))
    return written


def _write_item(
    i: int, item: Item, batch: _Batch, n_items: int, loaded: LoadedModel, settings: Settings
) -> Result:
    """Write the pictures, maps and (last) manifest of the ``i``-th item of a batch."""
    explanation = batch.explanation
    rows = range(i * batch.k, (i + 1) * batch.k)
    stem = output_stem(item.base, settings)
    chosen, pictures = _write_pictures(item, rows, batch, loaded, settings, stem)
    npz = _write_maps(explanation, rows, stem)
    nifti = _write_nifti(item, rows, explanation, stem)
    notes = list(item.warnings)
    notes += [w for r in rows if (w := explanation.warning(r))]
    notes += batch.warnings
    manifest_path = stem.with_name(stem.name + ".json")
    manifest = {
        "input": str(item.path),
        "kind": item.kind,
        **item.meta,
        "model": loaded.name,
        "model_source": loaded.source,
        "method": settings.method_name,
        "layer": explanation.layer,
        "options": {**settings.options, **explanation.options},
        "request": request_of(settings, loaded),
        "predictions": batch.predictions[i],
        "targets": chosen,
        "warnings": sorted(set(notes)),
        "outputs": {
            "pictures": [str(p) for p in pictures],
            "maps": str(npz),
            **({"nifti": [str(p) for p in nifti]} if nifti else {}),
            "manifest": str(manifest_path),
        },
        "seconds": batch.seconds / n_items,
        "batch": {"inputs": n_items, "maps": len(explanation), "seconds": batch.seconds},
        "device": str(batch.device),
        "engine": settings.engine,
        "versions": versions(),
    }
    _save_json_atomic(manifest_path, manifest)
    predicted = batch.predictions[i][0] if batch.predictions[i] else None
    return Result(item, manifest_path, pictures, predicted, tuple(manifest["warnings"]), chosen)
