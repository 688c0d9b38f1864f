"""How to explain: :class:`Settings` and :func:`make_settings`, which checks every value; the
checks that need no model (:func:`check_request`, :func:`check_picture`), targets
(:func:`parse_target`, :func:`known_labels`), the device (:func:`resolve_device`) and the method
(:func:`build_method`)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from evidencemap import viz
from evidencemap.engine.predictions import is_embedding
from evidencemap.models.loading import LoadedModel, read_labels
from evidencemap.targets import Target

__all__ = [
    "DEFAULT_CMAP",
    "FORMATS",
    "Settings",
    "TargetRequest",
    "build_method",
    "check_picture",
    "check_request",
    "known_labels",
    "make_settings",
    "parse_target",
    "resolve_device",
    "with_engine",
]


DEFAULT_CMAP = viz.DEFAULT_CMAP
"""The colour map of unsigned maps' pictures unless one is given (perceptually uniform);
signed maps get ``viz.SIGNED_CMAP``."""


FORMATS = ("png", "pdf", "svg", "tiff")
"""Picture formats: figures as PNG, PDF or SVG; bare maps (``bare=True``) as PNG or 16-bit
TIFF."""


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
    built-in classifier's (:func:`evidencemap.models.builtin_labels`, for every name of the
    built-in model table); ``None`` when they are only known once it is loaded (or for an
    embedding model)."""
    if labels is not None:
        return read_labels(labels)
    from evidencemap import models

    return models.builtin_labels(model)


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
        cmap: the pictures' colour map; ``None``: chosen by the map's sign, as
            ``viz.figure`` does (:data:`DEFAULT_CMAP` on [0, 1],
            or ``viz.SIGNED_CMAP`` on a symmetric scale
            for signed maps, ``viz.is_signed``).
        opacity: the heat colours' weight.
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
    cmap: str | None = None
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
    cmap: str | None = None,
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
    if cmap is not None and cmap not in colormaps:
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
    cmap: str | None = None,
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


def with_engine(settings: Settings, engine: str) -> Settings:
    """``settings`` with another ``engine`` name (the settings are frozen)."""
    return replace(settings, engine=engine)
