"""What the commands share: argument groups, device set-up, model and method construction."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evidencemap.engine import (
    DEFAULT_CMAP,
    FORMATS,
    check_picture,
    probabilities,
    resolve_device,
    top_predictions,
    versions,
)
from evidencemap.engine import build_method as engine_build_method
from evidencemap.models.loading import LoadedModel, load_model
from evidencemap.viz import SIGNED_CMAP

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_OUT",
    "CLIError",
    "add_model_arguments",
    "add_picture_arguments",
    "add_runtime_arguments",
    "build_method",
    "method_type",
    "model_from_args",
    "parse_option",
    "parse_options",
    "picture_settings",
    "positive_int",
    "probabilities",
    "setup_runtime",
    "top_predictions",
    "versions",
]

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_OUT = "evidencemap-out"


class CLIError(Exception):
    """A problem with what the user asked for; ``status`` is the exit status (2: usage)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def method_type(text: str) -> str:
    """argparse type: a registered method name (the canonical name is returned)."""
    from evidencemap.methods import get_method

    try:
        return get_method(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def float_list(count: int | None = None) -> Any:
    """argparse type: comma-separated floats (exactly ``count`` when given)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,2,3, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} numbers, got {text!r}")
        return values

    return parse


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: one or three positive ints, comma-separated (``224`` or ``64,128,128``)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or D,H,W integers, got {text!r}") from None
    if len(values) not in (1, 3) or not all(v >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 positive integers, got {text!r}")
    return values


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` → ``(key, value)``; values become bool, None, int, float or stay str.

    ``true``/``false``/``none`` (any case), then int, then float; anything else is a string.

    Raises:
        argparse.ArgumentTypeError: without ``=`` or with an empty or invalid key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise argparse.ArgumentTypeError(f"options are key=value with a Python name, got {text!r}")
    value: Any = raw.strip()
    lowered = value.lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    elif lowered == "none":
        value = None
    else:
        for convert in (int, float):
            try:
                value = convert(value)
                break
            except ValueError:
                continue
    return key, value


def parse_options(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    """The ``--option`` pairs as a dict (a later key wins)."""
    return dict(pairs or [])


# --------------------------------------------------------------------------- argument groups


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``."""
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N or mps (default: cpu); an error says what exists when the "
        "device is not available",
    )
    group.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads torch may use"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the preprocessing options of user models."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name, model file (TorchScript or pickled), module:factory (e.g. "
        f"mynet:build for mynet.py in this folder, or path/to/mynet.py:build), "
        f"torchvision:NAME or timm:NAME (default: {DEFAULT_MODEL}; see 'evidencemap models')",
    )
    group.add_argument(
        "--labels", type=Path, default=None, help="class names: a JSON list or one per line"
    )
    group.add_argument(
        "--input-size",
        type=int_list,
        default=None,
        help="user models: image crop side (default 224), or a volume size D,H,W to resize to",
    )
    group.add_argument(
        "--resize",
        type=positive_int,
        default=None,
        help="user image models: shorter side before the centre crop (default size·256/224)",
    )
    group.add_argument(
        "--mean",
        type=float_list(3),
        default=None,
        help="user image models: R,G,B mean of [0, 1] pixels (default ImageNet)",
    )
    group.add_argument(
        "--std",
        type=float_list(3),
        default=None,
        help="user image models: R,G,B std of [0, 1] pixels (default ImageNet)",
    )
    group.add_argument(
        "--window",
        type=float_list(2),
        default=None,
        help="volumes: intensity window LOW,HIGH mapped to [0, 1] (default: z-score per volume)",
    )


def add_picture_arguments(parser: argparse.ArgumentParser, *, bare: bool = True) -> None:
    """``--cmap``, ``--opacity``, ``--dpi``, ``--figsize``, ``--format`` (and ``--bare``)."""
    group = parser.add_argument_group("pictures")
    group.add_argument(
        "--cmap",
        default=None,
        help=f"matplotlib colormap (default: {DEFAULT_CMAP}, perceptually uniform; signed "
        f"maps: {SIGNED_CMAP} on a symmetric scale, red for the target)",
    )
    group.add_argument(
        "--opacity", type=unit_float, default=0.5, help="heat-map opacity in [0, 1] (0.5)"
    )
    group.add_argument(
        "--dpi", type=float, default=100.0, help="pixels per inch of the figure (default 100)"
    )
    group.add_argument(
        "--figsize",
        type=float_list(2),
        default=None,
        metavar="W,H",
        help="figure size in inches (default: sized by its panels)",
    )
    formats = FORMATS if bare else tuple(f for f in FORMATS if f != "tiff")
    group.add_argument(
        "--format",
        choices=formats,
        default="png",
        help="png, pdf or svg figures"
        + ("; with --bare: png or tiff (16-bit values)" if bare else "")
        + " (default: png)",
    )
    if bare:
        group.add_argument(
            "--bare",
            action="store_true",
            help="the map alone, no title, colour bar or axes: PNG over the photo, or "
            "--format tiff for the values (volumes: tiff only)",
        )


def picture_settings(args: argparse.Namespace, kind: str | None = None) -> dict[str, Any]:
    """The picture arguments as keywords of :func:`evidencemap.engine.make_settings`, checked.

    Raises:
        CLIError: for a format that does not go with ``--bare``, a bad ``--dpi`` or ``--figsize``.
    """
    bare = bool(getattr(args, "bare", False))
    try:
        figsize = check_picture(args.format, bare, args.dpi, args.figsize, kind)
    except ValueError as err:
        text = str(err)
        flag = next((f for f in ("dpi", "figsize") if text.startswith(f)), "format")
        raise CLIError(f"--{flag}: {text}") from err
    return {"dpi": args.dpi, "figsize": figsize, "format": args.format, "bare": bare}


# --------------------------------------------------------------------------- set-up


def setup_runtime(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and check ``--device`` (:func:`evidencemap.engine.resolve_device`).

    Raises:
        CLIError: for a malformed device, or CUDA / MPS that is not available (what exists is
            said).
    """
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return resolve_device(getattr(args, "device", "cpu"))
    except ValueError as err:
        raise CLIError(f"--{err}") from None


def model_from_args(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    """Load ``--model`` with the preprocessing options given.

    Raises:
        CLIError: when the model cannot be loaded (the message says why).
    """
    size = args.input_size
    try:
        return load_model(
            args.model,
            device,
            input_size=None if size is None else (size[0] if len(size) == 1 else size),
            resize=args.resize,
            mean=args.mean,
            std=args.std,
            labels=args.labels,
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err


def build_method(
    name: str,
    loaded: LoadedModel,
    layer: str | None,
    options: dict[str, Any],
    caps: dict[str, float] | None = None,
) -> Any:
    """An instance of method ``name`` for ``loaded.module`` with ``options``
    (:func:`evidencemap.engine.build_method`).

    Raises:
        CLIError: for an option the method does not take or rejects, a layer for an
            input-space method, or a method that cannot explain this model.
    """
    try:
        return engine_build_method(name, loaded, layer, options, caps)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err).replace("takes no layer", "takes no --layer")) from err
