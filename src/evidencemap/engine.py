"""The explain/batch engine: read inputs, explain them in batches, write one result per input.

What ``evidencemap explain`` and ``evidencemap batch`` run, and what every actor of
:mod:`evidencemap.distributed` runs: library code that never parses arguments and never prints;
it reports through the callbacks it is given (``on_result``, ``on_failure``) and through the
warnings of each :class:`Result`.

:class:`Settings` (a frozen dataclass) says how to explain; :func:`make_settings` builds it from
plain values (a model, a method name, a target, options), checking everything;
:func:`check_request` checks what can be checked before a model is loaded (the method's options
against its description, the colour map, the target's syntax and, for built-in models, its
class range).

Per input ``NAME`` and method ``M`` it writes, next to each other, under the *stem*
``NAME_M`` (:func:`output_stem`; ``top_k`` adds ``_topK``, a target other than the top class
adds ``_t<target>``, options, layer, frame or window other than the defaults add ``_o<hash>``
of them):

* ``STEM.png`` (``.pdf`` / ``.svg`` with ``format``; with ``top_k`` one picture per class,
  ``STEM_1.png`` … ``STEM_K.png``): photos get the overlay on the original photo, coloured
  only where the model looked (its centre crop, dashed box), with a colour bar and the title
  ``"LABEL — class probability"`` (``LABEL``: the method and the variant its options select,
  :attr:`Explanation.label <evidencemap.explanation.Explanation.label>`); volumes get axial,
  coronal and sagittal slices through the map's maximum. When a method returns an explanation
  image (FGVis: ``extras["explanation"]``, or ``extras["deleted"]`` in the deletion game) it
  is shown beside the model's view of the photo and the map. With ``bare``:
  ``STEM_bare.png`` (the map over the photo, nothing else) or ``STEM_bare.tiff`` (16-bit
  values at the model's input resolution).
* ``STEM.npz``: the one maps schema (:func:`evidencemap.io.save_explanation`, read back with
  :func:`evidencemap.io.load_maps`): ``maps`` ``(K, 1, *input)`` in [0, 1] at the model's
  input resolution, ``raw`` (the unnormalised maps at the layer's resolution), ``targets``,
  ``scores`` and what made them.
* ``STEM.nii.gz`` for volumes read with an affine (NIfTI, DICOM): the map on the input's grid
  with its affine (:func:`evidencemap.io.save_nifti`), to lay over the scan in a viewer.
* ``STEM.json``: the manifest, written last (atomically), so a manifest on disk means the
  input is finished. Its ``request`` records what was asked (model and its input size,
  method, target, top_k, options, layer, frame, window, picture settings);
  :func:`already_done` compares it with a new request, so a resumed ``batch`` skips only
  inputs computed with the same request.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from evidencemap import io, viz
from evidencemap.explanation import Explanation
from evidencemap.models.loading import LoadedModel, read_labels
from evidencemap.targets import Target

__all__ = [
    "DEFAULT_CMAP",
    "FORMATS",
    "Failure",
    "Item",
    "Result",
    "Settings",
    "TargetRequest",
    "already_done",
    "build_method",
    "check_picture",
    "check_request",
    "crop_region",
    "explain_items",
    "is_embedding",
    "known_labels",
    "make_settings",
    "output_bases",
    "output_stem",
    "parse_target",
    "prepare",
    "probabilities",
    "request_of",
    "resolve_device",
    "run_inputs",
    "strip_suffix",
    "top_predictions",
    "versions",
    "with_engine",
]

_PREDICTIONS = 5  # classes listed in every manifest
DEFAULT_CMAP = viz.DEFAULT_CMAP
"""The colour map of the pictures unless one is given (perceptually uniform)."""
FORMATS = ("png", "pdf", "svg", "tiff")
"""Picture formats: figures as PNG, PDF or SVG; bare maps (``bare=True``) as PNG or 16-bit
TIFF."""

# ----------------------------------------------------------------------------- devices


def resolve_device(text: str | torch.device) -> torch.device:
    """The torch device ``text`` names: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked.

    Raises:
        ValueError: for another name, a CUDA or MPS device that this torch cannot use (the
            message says what exists), or a CUDA index past the devices present.
    """
    name = str(text).strip().lower()
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use cpu"
                + (" or mps" if _mps_available() else "")
            )
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device {name}: only {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    if name == "mps" and not _mps_available():
        raise ValueError(
            f"device mps: Apple's Metal (MPS) is not available here (torch {torch.__version__})"
            "; use cpu" + (" or cuda" if torch.cuda.is_available() else "")
        )
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ----------------------------------------------------------------------------- model outputs


def is_embedding(loaded: LoadedModel) -> bool:
    """Whether the model outputs an embedding rather than class scores (the built-in volume
    models of :data:`evidencemap.models.CT_MODELS`): no classes, no probabilities."""
    from evidencemap.models import CT_MODELS

    return loaded.source == "builtin" and loaded.name in CT_MODELS


def probabilities(output: Tensor) -> Tensor | None:
    """Softmax over classes of an ``(N, K)`` output with ``K > 1``; ``None`` otherwise."""
    if output.ndim == 2 and output.shape[1] > 1:
        return torch.softmax(output.detach().float(), dim=1)
    return None


def top_predictions(output: Tensor, loaded: LoadedModel, k: int = 5) -> list[list[dict[str, Any]]]:
    """Per sample, the ``k`` highest classes: ``{"class", "label", "probability", "logit"}``.

    Outputs that are not ``(N, K)`` class scores, and embeddings (:func:`is_embedding`), give
    empty lists.
    """
    probs = None if is_embedding(loaded) else probabilities(output)
    if probs is None:
        return [[] for _ in range(output.shape[0])]
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    logits = output.detach().float().gather(1, indices)
    return [
        [
            {
                "class": int(c),
                "label": loaded.label(int(c)),
                "probability": float(p),
                "logit": float(z),
            }
            for c, p, z in zip(ci.tolist(), pi.tolist(), zi.tolist(), strict=True)
        ]
        for ci, pi, zi in zip(indices, values, logits, strict=True)
    ]


def versions() -> dict[str, str]:
    """Versions of evidencemap, torch and Python (written into every manifest)."""
    import evidencemap

    return {
        "evidencemap": evidencemap.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- targets

_IMPORT_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class TargetRequest:
    """What a target string asks for, before any model is loaded.

    ``kind`` is ``"class"`` (``value`` a non-negative index), ``"label"`` (a class name),
    ``"norm"`` (the L2 norm of an embedding output,
    :class:`~evidencemap.models.i3resnet.FeatureNorm`) or ``"callable"`` (``value``
    ``package.module:function``, a function from the model output ``(N, …)`` to ``(N,)``
    scores, imported when the settings are made).
    """

    kind: str
    value: str | int


def parse_target(text: str | int) -> TargetRequest:
    """The :class:`TargetRequest` of ``text``: an index, ``norm``, ``module:function`` or a label.

    Raises:
        ValueError: for a negative index or an empty text.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise TypeError(f"target must be a string or an int, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError("target is empty: give a class index, a label, norm or module:function")
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if index < 0:
            raise ValueError(f"target class index must be >= 0, got {index}")
        return TargetRequest("class", index)
    if text.lower() == "norm":
        return TargetRequest("norm", "norm")
    if _IMPORT_TARGET.match(text):
        return TargetRequest("callable", text)
    return TargetRequest("label", text)


def known_labels(model: str, labels: str | os.PathLike[str] | None = None) -> list[str] | None:
    """The class names of model spec ``model`` without loading it: a ``labels`` file, or a
    built-in classifier's; ``None`` when they are only known once it is loaded (or for an
    embedding model)."""
    if labels is not None:
        return read_labels(labels)
    from evidencemap import models
    from evidencemap.models.fer import FER_LABELS

    if model == "fer":
        return list(FER_LABELS)
    if model in models.builtin_names() and model.startswith("efficientnet-"):
        return models.labels()
    return None


def _check_target(request: TargetRequest, model: str, labels: list[str] | None) -> None:
    """Refuse a target the model spec ``model`` cannot take (as far as known before loading)."""
    from evidencemap.models import CT_MODELS

    embedding = model in CT_MODELS
    if embedding and request.kind in ("class", "label"):
        raise ValueError(
            f"target {request.value!r}: {model} outputs an embedding, not classes; give "
            "'norm' (the embedding's L2 norm) or 'module:function' (a function of the output)"
        )
    if labels is None:
        return
    if request.kind == "class" and int(request.value) >= len(labels):
        raise ValueError(
            f"target class {request.value} is out of range: the model has {len(labels)} classes "
            f"(0 to {len(labels) - 1})"
        )
    if request.kind == "label":
        _probe(labels).class_index(str(request.value))


def _probe(labels: list[str]) -> LoadedModel:
    """A model-less :class:`LoadedModel` that only names classes (for label look-ups)."""
    return LoadedModel(torch.nn.Identity(), None, labels, "labels", "image", "none")


def _import_target(text: str) -> Callable[[Tensor], Tensor]:
    module_name, _, attribute = text.partition(":")
    folder = os.getcwd()  # found from the current folder, like a model's import string
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"target {text!r}: cannot import {module_name!r}: {err}") from err
    finally:
        if added:
            sys.path.remove(folder)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"target {text!r}: {module_name} has no function {attribute!r}")
    return function


def _resolve_target(
    request: TargetRequest | None, loaded: LoadedModel
) -> tuple[Target, str | None]:
    """The target the method is called with and its name in outputs (``None``: top class)."""
    if request is None:
        if is_embedding(loaded):
            from evidencemap.models.i3resnet import FeatureNorm

            return FeatureNorm(), None
        return None, None
    _check_target(request, loaded.name if is_embedding(loaded) else "", None)
    if request.kind == "norm":
        from evidencemap.models.i3resnet import FeatureNorm

        return FeatureNorm(), "norm"
    if request.kind == "callable":
        return _import_target(str(request.value)), str(request.value)
    index = loaded.class_index(str(request.value))
    return index, str(index)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How to explain: the method instance and its name, the target, and the picture style.

    Build it with :func:`make_settings`, which checks every value.

    Attributes:
        method: the method instance (:func:`evidencemap.methods.build`).
        method_name: its registered name.
        target: what the method explains (``None``: each input's top class; a class index;
            a callable on the output).
        target_name: the target as written into output names and manifests (``"281"``,
            ``"norm"``, ``"package.module:function"``); ``None`` for the default target.
        top_k: explain each of the K top classes instead (then ``target`` is ``None``).
        layer: the layer name(s) asked for, comma-separated, or ``None``.
        options: the method options asked for (as given).
        cmap / opacity: the picture's colour map and heat opacity.
        dpi / figsize: the figure's pixels per inch and its size in inches (``None``: sized
            by its panels).
        format: ``png``, ``pdf`` or ``svg`` figures; with ``bare``: ``png`` or ``tiff``.
        bare: write the map alone, without title, colour bar or axes (:func:`viz.save_map
            <evidencemap.viz.save_map>`): photos as PNG over the photo, or 16-bit TIFF of the
            map's values at the model's input resolution (volumes: TIFF only, one page per
            axial slice).
        window: volumes: the intensity window ``(low, high)`` mapped to [0, 1] (``None``:
            z-score per volume).
        frame: volumes: the frame of a 4-D file to explain (``None``: the file must have the
            model's channels).
        engine: what ran it, in each manifest: ``local`` or ``ray``.
    """

    method: Any
    method_name: str
    target: Target = None
    target_name: str | None = None
    top_k: int | None = None
    layer: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    cmap: str = DEFAULT_CMAP
    opacity: float = 0.5
    dpi: float = 100.0
    figsize: tuple[float, float] | None = None
    format: str = "png"
    bare: bool = False
    window: tuple[float, float] | None = None
    frame: int | None = None
    engine: str = "local"


def _method_options(options: Mapping[str, Any], game: str | None) -> dict[str, Any]:
    """``options`` with FGVis's ``game`` when given."""
    merged = dict(options)
    if game is not None:
        merged["game"] = game
    return merged


def check_picture(
    format: str = "png",
    bare: bool = False,
    dpi: float = 100.0,
    figsize: Sequence[float] | None = None,
    kind: str | None = None,
) -> tuple[float, float] | None:
    """Check the picture settings (``kind``: ``"image"`` or ``"volume"`` when known); returns
    ``figsize`` as a pair.

    Raises:
        ValueError: for a format that is not in :data:`FORMATS` or does not go with ``bare``
            (figures: png, pdf, svg; bare maps: png, tiff; bare volume maps: tiff), a ``dpi``
            outside [10, 2400] or a ``figsize`` that is not two sides in [0.5, 100] inches.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if bare and format not in viz.MAP_FORMATS:
        raise ValueError(f"format {format}: a bare map is written as png or tiff")
    if not bare and format not in viz.FIGURE_FORMATS:
        raise ValueError(f"format {format}: figures are png, pdf or svg (tiff: with bare)")
    if bare and kind == "volume" and format != "tiff":
        raise ValueError("a bare map of a volume is a 16-bit TIFF: give format tiff")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 2400:
        raise ValueError(f"dpi must be a number in [10, 2400], got {dpi!r}")
    if figsize is None:
        return None
    sides = tuple(float(v) for v in figsize)
    if len(sides) != 2 or not all(0.5 <= v <= 100 for v in sides):
        raise ValueError(
            f"figsize must be WIDTH,HEIGHT in inches, each in [0.5, 100], got {figsize}"
        )
    return sides[0], sides[1]


def check_request(
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
    target: str | int | None = None,
    top_k: int | None = None,
    labels: str | os.PathLike[str] | None = None,
    cmap: str = DEFAULT_CMAP,
    frame: int | None = None,
) -> TargetRequest | None:
    """Check what can be checked without the model: the method's options against its
    description, the colour map, the target's syntax and — for built-in models and with a
    ``labels`` file — the class it names; returns the parsed target.

    Raises:
        ValueError / TypeError: naming the bad value and what is accepted.
    """
    from matplotlib import colormaps

    from evidencemap.methods import describe
    from evidencemap.methods.registry import check_options

    check_options(describe(method), dict(options or {}))
    if cmap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {cmap!r} (e.g. jet, viridis, inferno)")
    if frame is not None and (not isinstance(frame, int) or frame < 0):
        raise ValueError(f"frame must be an index >= 0, got {frame!r}")
    if target is not None and top_k is not None:
        raise ValueError("target and top_k exclude each other")
    request = None if target is None else parse_target(target)
    if model is not None:
        from evidencemap.models import CT_MODELS

        if top_k is not None and model in CT_MODELS:
            raise ValueError(f"top_k: {model} outputs an embedding, not classes")
        if request is not None:
            _check_target(request, model, known_labels(model, labels))
    return request


def build_method(
    name: str,
    loaded: LoadedModel,
    layer: str | None,
    options: Mapping[str, Any],
    caps: dict[str, float] | None = None,
) -> Any:
    """An instance of method ``name`` for ``loaded`` with ``options``
    (:func:`evidencemap.methods.build`); ``layer`` may name several layers separated by commas
    (their maps are averaged).

    Raises:
        ValueError / TypeError: for an option the method does not take or rejects, a layer for
            an input-space method, or a method that cannot explain this model; the message
            starts with ``method 'NAME'``.
    """
    from evidencemap.methods import build, describe
    from evidencemap.methods.registry import check_method_supports

    spec = describe(name)
    layers: str | list[str] | None = None
    if layer:
        parts = [p.strip() for p in layer.split(",") if p.strip()]
        layers = parts[0] if len(parts) == 1 else parts
    if layers is not None and not spec.uses_layer:
        raise ValueError(f"method {spec.name!r} works in input space and takes no layer")
    try:
        method = build(spec.cls, loaded.module, layers, caps=caps, **options)
        check_method_supports(loaded, method)
    except (TypeError, ValueError) as err:
        text = str(err)
        if text.startswith("method "):
            raise
        raise type(err)(f"method {spec.name!r}: {text}") from err
    return method


def make_settings(
    loaded: LoadedModel,
    method: str,
    *,
    target: str | int | None = None,
    top_k: int | None = None,
    layer: str | None = None,
    options: Mapping[str, Any] | None = None,
    game: str | None = None,
    cmap: str = DEFAULT_CMAP,
    opacity: float = 0.5,
    dpi: float = 100.0,
    figsize: Sequence[float] | None = None,
    format: str = "png",
    bare: bool = False,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
    batch_size: int = 16,
    engine: str = "local",
) -> Settings:
    """The :class:`Settings` for ``method`` on ``loaded``, every value checked.

    ``game`` sets FGVis's ``game`` option; with ``top_k`` each input is repeated once per class,
    so the method explains at most ``batch_size`` of them at once.

    Raises:
        ValueError / TypeError: for a bad target, colour map, option or layer (the message
            names it).
    """
    options = _method_options(options or {}, game)
    request = check_request(method, options, target=target, top_k=top_k, cmap=cmap, frame=frame)
    if top_k is not None and is_embedding(loaded):
        raise ValueError(f"top_k: {loaded.name} outputs an embedding, not classes")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    size = check_picture(format, bare, dpi, figsize, loaded.kind)
    resolved, target_name = _resolve_target(request, loaded)
    method_options = {"batch_size": batch_size, **options} if top_k else options
    instance = build_method(method, loaded, layer, method_options)
    return Settings(
        method=instance,
        method_name=instance.name,
        target=resolved,
        target_name=target_name,
        top_k=top_k,
        layer=layer,
        options=options,
        cmap=cmap,
        opacity=opacity,
        dpi=float(dpi),
        figsize=size,
        format=format,
        bare=bare,
        window=None if window is None else (float(window[0]), float(window[1])),
        frame=frame,
        engine=engine,
    )


# ----------------------------------------------------------------------------- names and resume


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


# ----------------------------------------------------------------------------- inputs


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
        warnings: what the reader noticed (a photo smaller than the model's input).
    """

    path: Path
    base: Path
    kind: str
    tensor: Tensor
    photo: Image.Image | None = None
    volume: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def crop_region(loaded: LoadedModel, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width × height`` photo inside the model's centre crop, in its pixels."""
    pre = loaded.preprocess
    if pre is None:
        raise ValueError("volume models have no crop")
    return pre.crop_box(width, height).region()


def _input_channels(loaded: LoadedModel) -> int | None:
    """The channels the model's first convolution takes (``None`` when it has none)."""
    for module in loaded.module.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int):
            return channels
    return None


def _prepare_volume(
    path: Path,
    base: Path,
    loaded: LoadedModel,
    window: tuple[float, float] | None,
    frame: int | None,
) -> Item:
    volume, meta = io.load_volume(path, frame=frame)
    wanted = _input_channels(loaded)
    # one channel is left to the model (some repeat it, like the inflated CT network)
    if wanted is not None and volume.shape[0] > 1 and volume.shape[0] != wanted:
        raise ValueError(
            f"{path}: {volume.shape[0]} channels, but {loaded.name} takes {wanted} "
            f"channel{'s' if wanted != 1 else ''}"
        )
    x = io.normalise_volume(volume, window)
    if loaded.input_size is not None and tuple(x.shape[1:]) != loaded.input_size:
        x = F.interpolate(x[None], size=loaded.input_size, mode="trilinear", align_corners=False)[0]
    kept = ("format", "original_shape", "shape", "spacing", "affine", "frame", "frames")
    meta = {k: meta[k] for k in kept if k in meta}
    meta["model_input_shape"] = list(x.shape)
    return Item(path, base, "volume", x, volume=volume, meta=meta)


def prepare(
    path: Path,
    base: Path,
    loaded: LoadedModel,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> Item:
    """Read ``path`` and turn it into the model's input (volumes: frame ``frame`` of a 4-D
    file when given). A photo smaller than the model's crop is upsampled, with a warning.

    Raises:
        FileNotFoundError: when it does not exist.
        ValueError: when it cannot be read, is a photo for a volume model or the reverse, or a
            4-D file without ``frame`` (the message names the 4th axis), or a volume whose
            channels the model does not take.
        ImportError: when a volume format needs a package that is missing.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if io.is_volume_path(path):
        if loaded.kind != "volume":
            raise ValueError(f"{path} is a volume but {loaded.name} takes images; give a 3-D model")
        return _prepare_volume(path, base, loaded, window, frame)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: use 'evidencemap batch' for folders")
    if loaded.kind != "image" or loaded.preprocess is None:
        raise ValueError(f"{path} is a photo but {loaded.name} takes volumes")
    photo = io.load_image(path)
    pre = loaded.preprocess
    x = pre(photo)
    region = crop_region(loaded, photo.width, photo.height)
    meta = {
        "image_size": [photo.width, photo.height],
        "model_input_shape": list(x.shape),
        "crop_region": [round(v, 2) for v in region],
    }
    notes = []
    size = int(getattr(pre, "size", 0))
    if min(photo.width, photo.height) < size:
        notes.append(
            f"the photo is {photo.width}×{photo.height} px, smaller than the model's "
            f"{size}×{size} input: it was upsampled, so the map has more detail than the photo"
        )
    return Item(path, base, "image", x, photo=photo, meta=meta, warnings=notes)


# ----------------------------------------------------------------------------- explain and write


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


@dataclass
class Failure:
    """An input that could not be explained, and why."""

    path: Path
    message: str


def _title(method: str, target: dict[str, Any]) -> str:
    if target.get("probability") is not None:
        return f"{method} — {target['label']} {target['probability']:.2f}"
    return f"{method} — {target['label']} (score {target['score']:.3g})"


def _figure(
    item: Item,
    loaded: LoadedModel,
    settings: Settings,
    heat: Tensor,
    title: str,
    explanation: tuple[str, Tensor] | None,
) -> Figure:
    """The figure for one map ``heat`` ``(1, *input)`` of ``item``."""
    cmap, alpha = settings.cmap, settings.opacity
    dpi, figsize = settings.dpi, settings.figsize
    if item.kind == "volume":
        if item.volume is None:
            raise ValueError(f"{item.path}: a volume item without its volume")
        spacing = item.meta.get("spacing")
        return viz.montage_plot(
            item.volume[0],
            heat,
            cmap,
            alpha,
            title=title,
            spacing=spacing,
            dpi=dpi,
            figsize=figsize,
        )
    pre = loaded.preprocess
    if pre is None or item.photo is None:
        raise ValueError(f"{item.path}: a photo needs the photo and an image model")
    if explanation is not None:
        seen = pre.to_pixels(item.tensor.to(heat.device)) / 255.0
        label, image = explanation
        shown = (pre.to_pixels(image.to(heat.device)) / 255.0).clamp(0, 1)
        return viz.grid_plot(
            seen,
            [(title, heat)],
            cmap=cmap,
            alpha=alpha,
            extra_images=[(label, shown)],
            dpi=dpi,
            figsize=figsize,
        )
    width, height = item.photo.size
    on_photo = pre.to_original(heat[None], width, height)[0].clamp(0, 1)
    region = crop_region(loaded, width, height)
    return viz.overlay_plot(
        item.photo, on_photo, title, cmap, alpha, region=region, dpi=dpi, figsize=figsize
    )


def _save_picture(
    item: Item,
    loaded: LoadedModel,
    settings: Settings,
    heat: Tensor,
    values: Tensor,
    path: Path,
    figure: Callable[[], Figure],
) -> Path:
    """Write the picture of ``heat`` (the map as displayed) to ``path`` + the format's suffix:
    the ``figure`` or, with ``settings.bare``, the map alone (``path`` + ``_bare`` + the
    suffix): over the photo as PNG, or the method's map ``values`` as 16-bit TIFF."""
    bare = "_bare" if settings.bare else ""
    target = path.with_name(f"{path.name}{bare}.{settings.format}")
    if not settings.bare and settings.format == "png":  # RGB, rendered at the figure's dpi
        return viz.save_png(viz.render(figure()), target)
    if not settings.bare:
        return viz.save_figure(figure(), target, settings.format, settings.dpi)
    if settings.format == "tiff" or item.kind == "volume":
        return viz.save_map(values, target, format="tiff")
    pre = loaded.preprocess
    if pre is None or item.photo is None:
        raise ValueError(f"{item.path}: a photo needs the photo and an image model")
    width, height = item.photo.size
    on_photo = pre.to_original(heat[None], width, height)[0].clamp(0, 1)
    region = crop_region(loaded, width, height)
    return viz.save_map(
        on_photo,
        target,
        image=item.photo,
        cmap=settings.cmap,
        alpha=settings.opacity,
        region=region,
        format="png",
    )


def _save_json_atomic(path: Path, obj: Any) -> Path:
    temporary = path.with_name(path.name + ".partial")
    io.save_json(temporary, obj)
    os.replace(temporary, path)
    return path


def _classes_to_explain(settings: Settings, x: Tensor) -> tuple[Target, int]:
    """Targets for the explain call and how many maps each input gets."""
    if settings.top_k is None:
        return settings.target, 1
    with torch.no_grad():
        output = settings.method.forward(x)
    if output.ndim != 2:
        raise ValueError(f"top_k needs (N, classes) model outputs, got shape {tuple(output.shape)}")
    k = min(settings.top_k, output.shape[1])
    classes = output.topk(k, dim=1).indices
    return classes.flatten().tolist(), k


_PASSED_ON = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning)


def _call_method(
    settings: Settings, inputs: Tensor, target: Target
) -> tuple[Explanation, list[str]]:
    """Call the method; the warnings it raises come back as messages (reported once with the
    results), except deprecations, which are passed on as they were."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = settings.method(inputs, target)
    messages = []
    for w in caught:
        if issubclass(w.category, _PASSED_ON):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            messages.append(str(w.message))
    return explanation, messages


@dataclass
class _Batch:
    """One call of the method on stacked items, and what every item's files share."""

    explanation: Explanation
    k: int
    seconds: float
    device: torch.device
    predictions: list[list[dict[str, Any]]]
    probs: Tensor | None
    shown: Tensor
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


def _beside(
    explanation: Explanation, row: int, item: Item, loaded: LoadedModel, target: dict[str, Any]
) -> tuple[str, Tensor] | None:
    """The explanation image shown beside the map of ``row`` (FGVis), recorded in ``target``."""
    shown_image = explanation.explanation_image(row)
    if shown_image is None or shown_image.image.ndim != item.tensor.ndim:
        return None
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
    return label, shown_image.image


def _write_pictures(
    item: Item, rows: range, batch: _Batch, loaded: LoadedModel, settings: Settings, stem: Path
) -> tuple[list[dict[str, Any]], list[Path]]:
    """One PNG per map of ``item`` (``rows`` of the batch); the target records and paths."""
    chosen: list[dict[str, Any]] = []
    pictures: list[Path] = []
    for rank, row in enumerate(rows, start=1):
        target = _target_record(batch, row, loaded, settings)
        suffix = f"_{rank}" if settings.top_k is not None else ""
        extra = _beside(batch.explanation, row, item, loaded, target)
        title = _title(batch.explanation.label, target)
        heat = batch.shown[row]
        picture = _save_picture(
            item,
            loaded,
            settings,
            heat,
            batch.explanation.maps[row],
            stem.with_name(f"{stem.name}{suffix}"),
            lambda: _figure(item, loaded, settings, heat, title, extra),  # noqa: B023
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


def explain_items(items: Sequence[Item], loaded: LoadedModel, settings: Settings) -> list[Result]:
    """Explain ``items`` in one call of the method and write their files.

    All items must have model inputs of one shape. With ``top_k`` the inputs are repeated ``K``
    times so that one call explains every (input, class) pair with per-sample targets. The
    warnings the method raises are not printed: they come back in each :class:`Result` (and
    its manifest), once.

    Returns:
        One :class:`Result` per item, in order.
    """
    if not items:
        return []
    device = next(loaded.module.parameters(), torch.empty(0)).device
    x = torch.stack([item.tensor for item in items]).to(device)
    start = time.perf_counter()
    targets, k = _classes_to_explain(settings, x)
    inputs = x.repeat_interleave(k, dim=0) if k > 1 else x
    explanation, messages = _call_method(settings, inputs, targets)
    seconds = time.perf_counter() - start
    output = explanation.output
    if output is None:
        raise ValueError(f"method {settings.method_name!r} did not report the model output")
    batch = _Batch(
        explanation=explanation,
        k=k,
        seconds=seconds,
        device=device,
        predictions=top_predictions(output[::k], loaded, _PREDICTIONS),
        probs=None if is_embedding(loaded) else probabilities(output),
        shown=viz.for_display(explanation.maps, explanation.raw),
        warnings=messages,
    )
    return [
        _write_item(i, item, batch, len(items), loaded, settings) for i, item in enumerate(items)
    ]


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
                item = prepare(path, base, loaded, settings.window, settings.frame)
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


def with_engine(settings: Settings, engine: str) -> Settings:
    """``settings`` with another ``engine`` name (the settings are frozen)."""
    return replace(settings, engine=engine)
