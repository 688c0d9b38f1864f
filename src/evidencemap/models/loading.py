"""The one model loader: a built-in name, a file, an import string or a module → :class:`LoadedModel`.

:func:`load_model` (also ``evidencemap.models.load``) accepts these forms of ``spec``:

* a built-in name (``efficientnet-lite0``; see :func:`evidencemap.models.builtin_names`, and
  the volume model ``ct-i3resnet152``);
* an ``nn.Module`` you built (it is put in eval mode; nothing is attached to it);
* a TorchScript file (``torch.jit.save``), recognised by its content. Scripted and traced
  modules run their submodules' compiled code directly, so forward hooks on their layers never
  fire: layer methods (the CAM family, Score-CAM) cannot explain them, input-space methods can
  (:func:`evidencemap.methods.registry.check_method_supports` says so clearly);
* a pickled full model (``torch.save(model, path)``), read with ``torch.load(weights_only=False)``.
  Unpickling runs arbitrary code from the file: load only files you trust. The model's class must
  be importable (the same module on ``sys.path``) when it is loaded;
* an import string ``package.module:factory`` (the factory is called with no arguments) or
  ``package.module:attribute`` naming a module object; the current directory is searched too;
  or a Python file and its factory, ``path/to/mynet.py:build`` (imported as ``mynet`` with its
  folder on the path);
* ``torchvision:NAME`` / ``timm:NAME`` when those packages are installed, with weights already
  in the local cache (nothing is ever downloaded).

Images for user models are preprocessed like ImageNet models usually are: shorter side resized
to ``resize`` (default ``round(input_size · 256 / 224)``), centre crop ``input_size`` (default
224), ``(pixel / 255 − mean) / std`` with ImageNet mean/std unless given.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evidencemap.models import builtin
from evidencemap.models.preprocess import ImagePreprocessor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_FORMS",
    "LoadedModel",
    "input_kind",
    "load_model",
    "read_labels",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means of pixels scaled to [0, 1]."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations of pixels scaled to [0, 1]."""

MODEL_FORMS: tuple[str, ...] = (
    "a built-in name (evidencemap models)",
    "a TorchScript file (torch.jit.save)",
    "a pickled full model file (torch.save(model, path); trusted files only)",
    "an import string package.module:factory (called with no arguments) or package.module:model",
    "a Python file and its factory, path/to/mynet.py:build",
    "torchvision:NAME or timm:NAME (locally cached weights only)",
)
"""The accepted forms of a model spec, as listed in error messages and ``evidencemap models``."""

_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PY_FILE_SPEC = re.compile(r"^(.+\.py):([A-Za-z_][\w.]*)$")
_VOLUME_LAYERS = frozenset(
    {
        "Conv3d",
        "ConvTranspose3d",
        "BatchNorm3d",
        "InstanceNorm3d",
        "MaxPool3d",
        "AvgPool3d",
        "AdaptiveAvgPool3d",
        "AdaptiveMaxPool3d",
    }
)
_IMAGE_LAYERS = frozenset({"Conv2d", "ConvTranspose2d", "BatchNorm2d", "MaxPool2d", "AvgPool2d"})


@dataclass(repr=False)
class LoadedModel:
    """A model ready to explain, with what is needed to feed it and to name its classes.

    The one model object of the library, the command line and the web service. Every method,
    metric and :func:`evidencemap.explain` takes it where they take a module (they use
    ``module``); calling it runs the module, and attributes it does not have are the module's
    (``loaded.parameters()``, ``loaded.predict(x)``), so code written for the bare module keeps
    working. ``isinstance(loaded, nn.Module)`` is false: pass ``loaded.module`` where a real
    module is needed.

    Attributes:
        module: the model, in eval mode on the requested device.
        preprocess: for image models, an :class:`ImagePreprocessor` (``__call__``, ``to_original``,
            ``crop_box``, ``to_pixels``); ``None`` for volume models.
        labels: class names index-aligned with the outputs, or ``None`` (classes are then called
            ``"class N"``).
        name: the spec it was loaded from.
        kind: ``"image"`` (``(N, C, H, W)`` inputs) or ``"volume"`` (``(N, C, D, H, W)``).
        source: the form it was loaded from: ``"builtin"``, ``"torchscript"``, ``"pickle"``,
            ``"import"``, ``"torchvision"`` or ``"timm"``.
        input_size: for volume models, the ``(D, H, W)`` every volume is resized to, or ``None``
            to feed volumes at their own size.
    """

    module: nn.Module
    preprocess: ImagePreprocessor | None
    labels: list[str] | None
    name: str
    kind: str
    source: str
    input_size: tuple[int, int, int] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward."""
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the dataclass lacks; dunder names (copy, pickle) never forward.
        if name.startswith("__") or name == "module" or "module" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["module"], name)

    def __repr__(self) -> str:
        return (
            f"LoadedModel(name={self.name!r}, kind={self.kind!r}, source={self.source!r}, "
            f"module={type(self.module).__name__}, preprocess={self.preprocess!r}, "
            f"labels={None if self.labels is None else len(self.labels)})"
        )

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the module to ``device`` (in place, like ``nn.Module.to``); returns ``self``."""
        self.module.to(device)
        return self

    def label(self, index: int) -> str:
        """The name of class ``index`` (``"class N"`` without labels or out of their range)."""
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def class_index(self, text: str) -> int:
        """The class that ``text`` names: a non-negative index, or an exact label.

        A label matches exactly first, then case-insensitively when that is unambiguous.

        Raises:
            ValueError: for a label that matches no class (similar labels are suggested) or
                several, or a negative index.
        """
        text = text.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            index = int(text)
            if index < 0:
                raise ValueError(f"target class index must be >= 0, got {index}")
            if self.labels is not None and index >= len(self.labels):
                raise ValueError(
                    f"target class {index} is out of range: the model has {len(self.labels)} labels"
                )
            return index
        if self.labels is None:
            raise ValueError(
                f"target {text!r} is not a class index and the model has no labels "
                "(give --labels FILE or a class index)"
            )
        if text in self.labels:
            return self.labels.index(text)
        folded = [i for i, name in enumerate(self.labels) if name.casefold() == text.casefold()]
        if len(folded) == 1:
            return folded[0]
        import difflib

        close = difflib.get_close_matches(text, self.labels, n=5, cutoff=0.6)
        hint = f"; similar labels: {', '.join(repr(c) for c in close)}" if close else ""
        raise ValueError(f"target {text!r} is neither a class index nor a label{hint}")


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a JSON list of strings, or a text file with one name per line.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a JSON value that is not a list of strings, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"labels file {path} is not valid JSON: {err}") from err
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"labels file {path} must hold a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if not names:
        raise ValueError(f"labels file {path} holds no labels")
    return names


def input_kind(module: nn.Module) -> str:
    """``"volume"`` when ``module`` contains 3-D layers (Conv3d, pooling, norm), else ``"image"``.

    Works for eager, pickled and TorchScript modules (whose submodules keep their class names).
    """
    names = {getattr(m, "original_name", type(m).__name__) for m in module.modules()}
    names |= {type(m).__name__ for m in module.modules()}
    if names & _VOLUME_LAYERS and not names & _IMAGE_LAYERS:
        return "volume"
    return "image"


def _looks_like_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``<name>/constants.pkl`` and compiled ``<name>/code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def _image_preprocess(
    input_size: int | None,
    resize: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> ImagePreprocessor:
    size = 224 if input_size is None else int(input_size)
    if size < 1:
        raise ValueError(f"input_size must be >= 1, got {size}")
    resize = round(size * 256 / 224) if resize is None else int(resize)
    if resize < size:
        raise ValueError(f"resize must be >= input_size ({size}), got {resize}")
    mean = IMAGENET_MEAN if mean is None else tuple(float(m) for m in mean)
    std = IMAGENET_STD if std is None else tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {mean} and {std}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    # ImagePreprocessor works on 0…255 pixels: (p/255 − m)/s = (p − 255 m)/(255 s).
    return ImagePreprocessor(
        size=size,
        resize=resize,
        mean=tuple(255.0 * m for m in mean),  # type: ignore[arg-type]
        std=tuple(255.0 * s for s in std),  # type: ignore[arg-type]
    )


def _volume_size(input_size: int | Sequence[int] | None) -> tuple[int, int, int] | None:
    if input_size is None:
        return None
    sizes = [int(input_size)] * 3 if isinstance(input_size, int) else [int(s) for s in input_size]
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or not all(s >= 1 for s in sizes):
        raise ValueError(f"volume input_size must be 1 or 3 positive ints (D, H, W), got {sizes}")
    return sizes[0], sizes[1], sizes[2]


def _import_object(spec: str, folder: str | None = None) -> Any:
    """The module object, or what the factory returns, of ``module:attribute``, imported with
    ``folder`` (default: the current one) on ``sys.path``."""
    module_name, _, attribute = spec.partition(":")
    folder = os.getcwd() if folder is None else folder
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {err}") from err
        for part in attribute.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{module_name!r} has no attribute {attribute!r} (from {spec!r})")
            obj = getattr(obj, part)
        if isinstance(obj, nn.Module):
            return obj
        if not callable(obj):
            raise ValueError(f"{spec!r} is neither an nn.Module nor a factory function")
        model = obj()
    finally:
        if added:
            sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_file(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    if _looks_like_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=device), "torchscript"
        except RuntimeError as err:
            raise ValueError(f"{path} is not a loadable TorchScript model: {err}") from err
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is neither a TorchScript nor a pickled model: {err}") from err
    except (AttributeError, ModuleNotFoundError) as err:
        raise ValueError(
            f"{path} is a pickled model whose class cannot be imported ({err}); put the module "
            "that defines it on PYTHONPATH"
        ) from err
    if isinstance(obj, nn.Module):
        return obj, "pickle"
    if isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a state dict (parameters only), not a model: write a factory that "
            "builds the model and loads it, and pass package.module:factory"
        )
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _load_torchvision(name: str) -> tuple[nn.Module, ImagePreprocessor, list[str] | None]:
    try:
        import torchvision  # optional: pip install torchvision
    except ImportError as err:
        raise ValueError(
            f"torchvision:{name} needs torchvision, which is not importable here ({err}); "
            "pip install 'evidencemap[vision]' or use another model form"
        ) from err
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as err:
        raise ValueError(f"torchvision has no model {name!r}: {err}") from err
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(weights.url).name)
    if not cached.is_file():
        raise ValueError(
            f"the weights of torchvision:{name} are not in the local cache ({cached}); "
            "evidencemap never downloads: fetch them once with torchvision on a connected "
            "machine (or copy the file there)"
        )
    model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    transforms = weights.transforms()
    preprocess = _image_preprocess(
        transforms.crop_size[0], transforms.resize_size[0], transforms.mean, transforms.std
    )
    return model, preprocess, list(weights.meta.get("categories") or []) or None


def _load_timm(name: str) -> tuple[nn.Module, ImagePreprocessor, list[str] | None]:
    try:
        import timm  # optional: pip install timm
        from timm.data import resolve_data_config
    except ImportError as err:
        raise ValueError(
            f"timm:{name} needs timm, which is not importable here ({err}); "
            "pip install 'evidencemap[vision]' or use another model form"
        ) from err
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read from the local cache only, never download
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as err:  # timm/huggingface raise many types for a missing cache entry
        raise ValueError(
            f"cannot build timm:{name} from locally cached weights ({type(err).__name__}: {err}); "
            "evidencemap never downloads: cache the weights once on a connected machine"
        ) from err
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    config = resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    resize = round(size / float(config.get("crop_pct", 0.875)))
    preprocess = _image_preprocess(size, resize, config["mean"], config["std"])
    labels = builtin.labels() if getattr(model, "num_classes", None) == 1000 else None
    return model, preprocess, labels


def load_model(
    spec: str | nn.Module = "efficientnet-lite0",
    device: str | torch.device = "cpu",
    *,
    input_size: int | Sequence[int] | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    kind: str | None = None,
) -> LoadedModel:
    """Load a model from any accepted ``spec`` (see the module docstring), in eval mode.

    Args:
        spec: built-in name, model file, ``package.module:factory``, ``torchvision:NAME``,
            ``timm:NAME``, or an ``nn.Module`` (named after its class).
        device: where the model goes.
        input_size: image models: side of the square crop (default 224); volume models: one
            int or ``(D, H, W)`` every volume is resized to (default: their own size).
        resize: image models: shorter side before cropping (default ``input_size · 256/224``).
        mean / std: image models: channel mean/std on [0, 1] pixels (default ImageNet).
        labels: a labels file (JSON list or one per line) or a list of names.
        kind: ``"image"`` or ``"volume"``; ``None`` decides from the model's layers.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        TypeError: when ``spec`` is neither a string nor an ``nn.Module``.
        ValueError: for an unknown form (the message lists the accepted ones), a missing file,
            an unloadable model, preprocessing options for a built-in model, or a missing
            optional package / cached weights.
        FileNotFoundError: for a labels file that does not exist.
    """
    if kind not in (None, "image", "volume"):
        raise ValueError(f"kind must be 'image', 'volume' or None, got {kind!r}")
    device = torch.device(device)
    preprocess: ImagePreprocessor | None = None
    names: list[str] | None = None
    if isinstance(spec, nn.Module):
        module, source, spec = spec, "module", type(spec).__name__
    elif isinstance(spec, str):
        given = tuple(
            name
            for name, value in (
                ("input_size", input_size),
                ("resize", resize),
                ("mean", mean),
                ("std", std),
            )
            if value is not None
        )
        module, source, preprocess, names = _from_spec(spec, device, given)
    else:
        raise TypeError(
            f"model must be a string spec or a torch.nn.Module, got {type(spec).__name__}"
        )
    module = module.to(device).eval()
    detected = kind or input_kind(module)
    volume_size = None
    if detected == "image" and preprocess is None:
        preprocess = _image_preprocess(
            None if input_size is None else _single(input_size), resize, mean, std
        )
    elif detected == "volume":
        if resize is not None or mean is not None or std is not None:
            raise ValueError("resize, mean and std apply to image models; this one takes volumes")
        preprocess, volume_size = None, _volume_size(input_size)
    if labels is not None:
        names = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
    return LoadedModel(module, preprocess, names, spec, detected, source, volume_size)


def _from_spec(
    spec: str, device: torch.device, preprocessing_given: Sequence[str]
) -> tuple[nn.Module, str, ImagePreprocessor | None, list[str] | None]:
    """``(module, source, preprocess, labels)`` of a string spec (the last two ``None`` unless
    the form brings its own). ``preprocessing_given`` names the preprocessing options given:
    built-in image models refuse them all, the built-in volume models all but ``input_size``
    (the size every volume is resampled to)."""
    path = Path(spec).expanduser()
    if spec in builtin.builtin_names() or spec in builtin.CT_MODELS:
        refused = [
            n for n in preprocessing_given if spec not in builtin.CT_MODELS or n != "input_size"
        ]
        if refused:
            volume = spec in builtin.CT_MODELS
            raise ValueError(
                f"{spec} brings its own preprocessing; "
                + (
                    "of input size, resize, mean and std it takes only the input size (D, H, W)"
                    if volume
                    else "input size, resize, mean and std apply to user models only"
                )
            )
        module, preprocess, names = builtin.build_builtin(spec, device)
        return module, "builtin", preprocess, names
    if spec.startswith(("torchvision:", "timm:")):
        source, _, name = spec.partition(":")
        loader = _load_torchvision if source == "torchvision" else _load_timm
        module, preprocess, names = loader(name)
        return module, source, preprocess, names
    file_spec = _PY_FILE_SPEC.match(spec)
    if file_spec is not None and Path(file_spec.group(1)).expanduser().is_file():
        script = Path(file_spec.group(1)).expanduser().resolve()
        if not script.stem.isidentifier():
            raise ValueError(f"model {spec!r}: {script.name} is not an importable module name")
        return (
            _import_object(f"{script.stem}:{file_spec.group(2)}", str(script.parent)),
            "import",
            None,
            None,
        )
    if file_spec is not None:
        raise ValueError(f"model file not found: {file_spec.group(1)} (from {spec!r})")
    if path.is_file():
        module, source = _load_file(path, device)
        return module, source, None, None
    if path.is_dir():
        raise ValueError(f"model {spec!r} is a folder; give a model file")
    if _IMPORT_STRING.match(spec):
        return _import_object(spec), "import", None, None
    if any(sep in spec for sep in "/\\") or path.suffix in (".pt", ".pth", ".pkl", ".ts"):
        raise ValueError(f"model file not found: {spec}")
    forms = "; ".join(MODEL_FORMS)
    raise ValueError(
        f"cannot load model {spec!r}: accepted forms are {forms}. "
        f"Built-in names: {', '.join(builtin.builtin_names())}"
    )


def _single(size: int | Sequence[int]) -> int:
    if isinstance(size, int):
        return size
    values = list(size)
    if len(values) == 1 or len(set(values)) == 1:
        return int(values[0])
    raise ValueError(f"image input_size must be one int (square crop), got {values}")
