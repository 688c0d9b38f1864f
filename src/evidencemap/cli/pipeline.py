"""The work behind ``explain`` and ``batch``: read inputs, explain them in batches, write results.

Per input ``NAME`` and method ``M`` it writes, next to each other:

* ``NAME_M.png`` (or ``NAME_M_topK.png`` per class with ``--top-k``): photos get the overlay on
  the original photo, coloured only where the model looked (its centre crop, dashed box), with a
  colour bar and the title ``"M — label probability"``; volumes get axial, coronal and sagittal
  slices through the map's maximum. When a method returns an explanation image (FGVis:
  ``extras["explanation"]``, or ``extras["deleted"]`` in the deletion game) it is shown beside
  the model's view of the photo and the map.
* ``NAME_M.npz``: ``maps`` ``(K, 1, *input)`` in [0, 1] at the model's input resolution,
  ``raw`` (the unnormalised maps at the layer's resolution), ``targets``, ``scores``.
* ``NAME_M.json``: the manifest, written last (atomically), so a manifest on disk means the
  input is finished — ``batch`` resumes by skipping those.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from evidencemap import io, viz
from evidencemap.cli.common import probabilities, top_predictions, versions
from evidencemap.models.loading import LoadedModel

__all__ = [
    "Failure",
    "Item",
    "Result",
    "Settings",
    "crop_region",
    "explain_items",
    "output_bases",
    "prepare",
    "run_inputs",
    "strip_suffix",
]

_PREDICTIONS = 5  # classes listed in every manifest


@dataclass
class Settings:
    """How to explain: the method instance and its name, the targets, and the picture style.

    ``engine`` names what ran it in each manifest: ``local`` or ``ray``
    (:mod:`evidencemap.distributed`).
    """

    method: Any
    method_name: str
    target: int | None = None
    top_k: int | None = None
    layer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cmap: str = "jet"
    opacity: float = 0.5
    window: tuple[float, float] | None = None
    engine: str = "local"


@dataclass
class Item:
    """One input read and preprocessed.

    Attributes:
        path: the input file (or DICOM folder).
        base: output path without the ``_METHOD.ext`` ending.
        kind: ``"image"`` or ``"volume"``.
        tensor: the model input, ``(C, H, W)`` or ``(C, D, H, W)``.
        photo: the original photo (images), else ``None``.
        volume: the original volume ``(C, D, H, W)`` (volumes), else ``None``.
        meta: what the manifest should say about the input (size, crop, spacing…).
    """

    path: Path
    base: Path
    kind: str
    tensor: Tensor
    photo: Image.Image | None = None
    volume: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What was written for one input."""

    item: Item
    manifest: Path
    pictures: list[Path]
    predicted: dict[str, Any] | None
    warnings: tuple[str, ...] = ()


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


def crop_region(loaded: LoadedModel, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width × height`` photo inside the model's centre crop, in its pixels."""
    pre = loaded.preprocess
    if pre is None:
        raise ValueError("volume models have no crop")
    return pre.crop_box(width, height).region()


def prepare(
    path: Path, base: Path, loaded: LoadedModel, window: tuple[float, float] | None = None
) -> Item:
    """Read ``path`` and turn it into the model's input.

    Raises:
        FileNotFoundError: when it does not exist.
        ValueError: when it cannot be read, or is a photo for a volume model or the reverse.
        ImportError: when a volume format needs a package that is missing.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if io.is_volume_path(path):
        if loaded.kind != "volume":
            raise ValueError(
                f"{path} is a volume but {loaded.name} takes images; give a 3-D model with --model"
            )
        volume, meta = io.load_volume(path)
        x = io.normalise_volume(volume, window)
        if loaded.input_size is not None and tuple(x.shape[1:]) != loaded.input_size:
            x = F.interpolate(
                x[None], size=loaded.input_size, mode="trilinear", align_corners=False
            )[0]
        meta = {k: meta[k] for k in ("format", "original_shape", "shape", "spacing")}
        meta["model_input_shape"] = list(x.shape)
        return Item(path, base, "volume", x, volume=volume, meta=meta)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: use 'evidencemap batch' for folders")
    if loaded.kind != "image" or loaded.preprocess is None:
        raise ValueError(f"{path} is a photo but {loaded.name} takes volumes")
    photo = io.load_image(path)
    x = loaded.preprocess(photo)
    region = crop_region(loaded, photo.width, photo.height)
    meta = {
        "image_size": [photo.width, photo.height],
        "model_input_shape": list(x.shape),
        "crop_region": [round(v, 2) for v in region],
    }
    return Item(path, base, "image", x, photo=photo, meta=meta)


def _title(method: str, target: dict[str, Any]) -> str:
    if target.get("probability") is not None:
        return f"{method} — {target['label']} {target['probability']:.2f}"
    return f"{method} — {target['label']} (score {target['score']:.3g})"


def _picture(
    item: Item,
    loaded: LoadedModel,
    settings: Settings,
    heat: Tensor,
    title: str,
    explanation: tuple[str, Tensor] | None,
) -> Image.Image:
    """The PNG for one map ``heat`` ``(1, *input)`` of ``item``."""
    cmap, alpha = settings.cmap, settings.opacity
    if item.kind == "volume":
        if item.volume is None:
            raise ValueError(f"{item.path}: a volume item without its volume")
        spacing = item.meta.get("spacing")
        return viz.montage(item.volume[0], heat, cmap, alpha, title=title, spacing=spacing)
    pre = loaded.preprocess
    if pre is None or item.photo is None:
        raise ValueError(f"{item.path}: a photo needs the photo and an image model")
    if explanation is not None:
        seen = pre.to_pixels(item.tensor.to(heat.device)) / 255.0
        label, image = explanation
        shown = (pre.to_pixels(image.to(heat.device)) / 255.0).clamp(0, 1)
        return viz.grid(
            seen, [(title, heat)], cmap=cmap, alpha=alpha, extra_images=[(label, shown)]
        )
    width, height = item.photo.size
    on_photo = pre.to_original(heat[None], width, height)[0].clamp(0, 1)
    region = crop_region(loaded, width, height)
    return viz.overlay_figure(item.photo, on_photo, title, cmap, alpha, region=region)


def _save_json_atomic(path: Path, obj: Any) -> Path:
    temporary = path.with_name(path.name + ".partial")
    io.save_json(temporary, obj)
    os.replace(temporary, path)
    return path


def _classes_to_explain(
    settings: Settings, x: Tensor, forward: Callable[[Tensor], Tensor]
) -> tuple[list[int] | int | None, int]:
    """Targets for the explain call and how many maps each input gets."""
    if settings.top_k is None:
        return settings.target, 1
    with torch.no_grad():
        output = forward(x)
    if output.ndim != 2:
        raise ValueError(
            f"--top-k needs (N, classes) model outputs, got shape {tuple(output.shape)}"
        )
    k = min(settings.top_k, output.shape[1])
    classes = output.topk(k, dim=1).indices
    return classes.flatten().tolist(), k


def explain_items(items: Sequence[Item], loaded: LoadedModel, settings: Settings) -> list[Result]:
    """Explain ``items`` in one call of the method and write their files.

    All items must have model inputs of one shape. With ``top_k`` the inputs are repeated ``K``
    times so that one call explains every (input, class) pair with per-sample targets.

    Returns:
        One :class:`Result` per item, in order.
    """
    if not items:
        return []
    method = settings.method
    device = next(loaded.module.parameters(), torch.empty(0)).device
    x = torch.stack([item.tensor for item in items]).to(device)
    start = time.perf_counter()
    targets, k = _classes_to_explain(settings, x, method.forward)
    inputs = x.repeat_interleave(k, dim=0) if k > 1 else x
    explanation = method(inputs, targets)
    seconds = time.perf_counter() - start

    output = explanation.output
    if output is None:
        raise ValueError(f"method {settings.method_name!r} did not report the model output")
    firsts = output[::k]
    predictions = top_predictions(firsts, loaded, _PREDICTIONS)
    probs = probabilities(output)
    count = len(explanation)
    shown = viz.for_display(explanation.maps, explanation.raw)
    results = []
    for i, item in enumerate(items):
        rows = range(i * k, (i + 1) * k)
        chosen = []
        pictures: list[Path] = []
        for rank, row in enumerate(rows, start=1):
            cls = None if explanation.targets is None else int(explanation.targets[row])
            target = {
                "class": cls,
                "label": loaded.label(cls) if cls is not None else "custom target",
                "probability": None if probs is None or cls is None else float(probs[row, cls]),
                "score": float(explanation.scores[row]),
            }
            suffix = f"_top{rank}" if settings.top_k is not None else ""
            png = item.base.with_name(f"{item.base.name}_{settings.method_name}{suffix}.png")
            extra = None
            shown_image = explanation.explanation_image(row)
            if shown_image is not None and shown_image.image.ndim == item.tensor.ndim:
                label = "explanation" if shown_image.kind == "explanation" else "deleted evidence"
                target["shown_beside"] = shown_image.kind
                if shown_image.score is not None:
                    # the explanation is a model input: the model's score on it is reported
                    # (deletion game: on the image with the evidence removed)
                    target["explanation_score"] = shown_image.score
                    text = "p" if shown_image.kind == "explanation" else "p without it"
                    label = f"{label}, {text} {shown_image.score:.2f}"
                if shown_image.top1 is not None:
                    target["explanation_top1"] = {
                        "class": shown_image.top1,
                        "label": loaded.label(shown_image.top1),
                    }
                extra = (label, shown_image.image)
            heat = shown[row]
            viz.save_png(
                _picture(item, loaded, settings, heat, _title(settings.method_name, target), extra),
                png,
            )
            target["picture"] = str(png)
            chosen.append(target)
            pictures.append(png)
        stem = item.base.with_name(f"{item.base.name}_{settings.method_name}")
        arrays: dict[str, Any] = {
            "maps": explanation.maps[rows.start : rows.stop],
            "scores": explanation.scores[rows.start : rows.stop],
        }
        raw = explanation.raw
        if isinstance(raw, list):
            for j, part in enumerate(raw):
                arrays[f"raw_{j}"] = part[rows.start : rows.stop]
        else:
            arrays["raw"] = raw[rows.start : rows.stop]
        if explanation.targets is not None:
            arrays["targets"] = explanation.targets[rows.start : rows.stop]
        npz = io.save_maps(stem.with_name(stem.name + ".npz"), **arrays)
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
            "predictions": predictions[i],
            "targets": chosen,
            "warnings": sorted({w for r in rows if (w := explanation.warning(r))}),
            "outputs": {
                "pictures": [str(p) for p in pictures],
                "maps": str(npz),
                "manifest": str(manifest_path),
            },
            "seconds": seconds / len(items),
            "batch": {"inputs": len(items), "maps": count, "seconds": seconds},
            "device": str(device),
            "engine": settings.engine,
            "versions": versions(),
        }
        _save_json_atomic(manifest_path, manifest)
        predicted = predictions[i][0] if predictions[i] else None
        results.append(
            Result(item, manifest_path, pictures, predicted, tuple(manifest["warnings"]))
        )
    return results


@dataclass
class Failure:
    """An input that could not be explained, and why."""

    path: Path
    message: str


def run_inputs(
    paths: Sequence[Path],
    bases: Sequence[Path],
    loaded: LoadedModel,
    settings: Settings,
    batch_size: int,
    on_result: Callable[[Result], None],
    on_failure: Callable[[Failure], None],
) -> None:
    """Explain ``paths`` ``batch_size`` at a time, reporting each result or failure as it comes.

    Inputs are read a batch at a time (never all at once). Within a batch, inputs whose model
    inputs have one shape go through one call of the method. A file that cannot be read fails
    alone; an error of the model or the method fails the inputs of that call; the rest goes on.
    """
    for start in range(0, len(paths), batch_size):
        groups: dict[tuple[str, tuple[int, ...]], list[Item]] = {}
        for path, base in zip(
            paths[start : start + batch_size], bases[start : start + batch_size], strict=True
        ):
            try:
                item = prepare(path, base, loaded, settings.window)
            except (OSError, ValueError, ImportError) as err:
                on_failure(Failure(path, str(err)))
                continue
            groups.setdefault((item.kind, tuple(item.tensor.shape)), []).append(item)
        for items in groups.values():
            try:
                results = explain_items(items, loaded, settings)
            except (RuntimeError, ValueError, TypeError, OSError) as err:
                message = (
                    f"{type(err).__name__}: {err}" if isinstance(err, RuntimeError) else str(err)
                )
                for item in items:
                    on_failure(Failure(item.path, message))
                continue
            for result in results:
                on_result(result)
