"""``evidencemap compare IMAGE --methods a,b,c``: one grid of several methods' maps."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evidencemap import io, viz
from evidencemap.cli.common import (
    DEFAULT_OUT,
    CLIError,
    add_model_arguments,
    add_picture_arguments,
    add_runtime_arguments,
    build_method,
    method_type,
    model_from_args,
    picture_settings,
    setup_runtime,
)
from evidencemap.engine import (
    check_request,
    crop_region,
    is_embedding,
    output_bases,
    prepare,
    top_predictions,
    versions,
)
from evidencemap.explanation import Explanation

__all__ = ["DEFAULT_METHODS", "register", "run"]

DEFAULT_METHODS = "gradcam,gradcam++,layercam,eigencam"
HELP = "compare several methods on one photo: one grid PNG and a JSON manifest"
EXAMPLES = """examples:
  evidencemap compare examples/chelsea.jpg --out evidencemap-out
  evidencemap compare photo.jpg --methods gradcam,hirescam,scorecam --target 285
"""


def method_list(text: str) -> list[str]:
    """argparse type: comma-separated method names (canonical, without repeats)."""
    names = [method_type(part.strip()) for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method")
    return list(dict.fromkeys(names))


def register(subparsers: Any) -> None:
    """Add the ``compare`` command."""
    parser = subparsers.add_parser(
        "compare",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the photo")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=method_list(DEFAULT_METHODS),
        help=f"comma-separated method names (default: {DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="class to explain: an index or an exact label (default: the top class)",
    )
    parser.add_argument(
        "--layer", default=None, help="layer name(s) for the layer methods, comma-separated"
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    add_picture_arguments(parser)
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """What can be checked before the model loads: ``--cmap``, ``--target``, the photo."""
    try:
        check_request(args.methods[0], cmap=args.cmap)
    except ValueError as err:
        raise CLIError(f"--cmap: {err}") from err
    try:
        check_request(args.methods[0], model=args.model, target=args.target, labels=args.labels)
    except FileNotFoundError as err:
        raise CLIError(f"--labels: {err}") from err
    except (TypeError, ValueError) as err:
        raise CLIError(f"--target: {err}") from err
    picture_settings(args)
    if not args.image.exists():
        raise CLIError(f"{args.image}: no such file")


@dataclass
class _Compared:
    """Each method's explanation on the photo and what the grid draws of it."""

    explanations: dict[str, Explanation] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    panels: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    scale: tuple[float, float] | None = None
    cmap: str = viz.DEFAULT_CMAP
    label: str = viz.EVIDENCE_LABEL


def _explain_all(
    methods: dict[str, Any], x: torch.Tensor, target: int, loaded: Any, item: Any, cmap: str | None
) -> _Compared:
    """Each method's map on the photo, coloured as :func:`evidencemap.viz.look` decides.

    The grid has one colour bar: when no map is signed it is the 0–1 evidence scale; when one
    is (:func:`evidencemap.viz.is_signed`), every panel is drawn on ``[−1, 1]`` with the
    diverging colour map — signed maps divided by their symmetric scale ``m``, unsigned maps
    (evidence for the target, in [0, 1]) on its positive half."""
    pre = loaded.preprocess
    width, height = item.photo.size
    compared = _Compared()
    looks = []
    for name, method in methods.items():
        start = time.perf_counter()
        explanation = method(x, target)
        compared.seconds[name] = time.perf_counter() - start
        compared.explanations[name] = explanation
        looks.append((explanation.label, viz.look(explanation, 0)))
    signed = any(look.signed for _, look in looks)
    for label, look in looks:
        heat = look.heat if look.scale is None else look.heat / look.scale[1]
        on_photo = pre.to_original(heat[None].float(), width, height)[0]
        compared.panels.append((label, on_photo.clamp(-1 if signed else 0, 1)))
    if signed:
        compared.scale, compared.cmap, compared.label = (
            (-1.0, 1.0),
            viz.SIGNED_CMAP,
            viz.SIGNED_LABEL,
        )
    compared.cmap = cmap or compared.cmap
    return compared


def _write_pictures(
    args: argparse.Namespace,
    item: Any,
    loaded: Any,
    compared: _Compared,
    title: str,
    picture: dict[str, Any],
) -> list[Path]:
    """The grid figure (``NAME_compare.FORMAT``) or, with ``--bare``, one bare map per method
    (``NAME_compare_METHOD.png`` over the photo, or ``.tiff`` of the method's map ``values``
    at the model's input resolution)."""
    base = item.base
    width, height = item.photo.size
    region = crop_region(loaded, width, height)
    low, high = compared.scale if compared.scale is not None else (None, None)
    if not picture["bare"]:
        figure = viz.grid_plot(
            item.photo,
            compared.panels,
            title=title,
            cmap=compared.cmap,
            alpha=args.opacity,
            region=region,
            vmin=low,
            vmax=high,
            colorbar_label=compared.label,
            dpi=picture["dpi"],
            figsize=picture["figsize"],
        )
        path = base.with_name(f"{base.name}_compare.{picture['format']}")
        if picture["format"] == "png":  # RGB, rendered at the figure's dpi
            return [viz.save_png(viz.render(figure), path)]
        return [viz.save_figure(figure, path, picture["format"], picture["dpi"])]
    written = []
    values = [e.maps[0] for e in compared.explanations.values()]
    for (name, heat), value in zip(compared.panels, values, strict=True):
        safe = _safe(name)
        path = base.with_name(f"{base.name}_compare_{safe}.{picture['format']}")
        if picture["format"] == "tiff":
            written.append(viz.save_map(value, path, format="tiff"))
        else:
            written.append(
                viz.save_map(
                    heat,
                    path,
                    image=item.photo,
                    cmap=compared.cmap,
                    alpha=args.opacity,
                    region=region,
                    vmin=low,
                    vmax=high,
                    format="png",
                )
            )
    return written


def _safe(name: str) -> str:
    """``name`` as a file name part: runs of other characters than ``A-Za-z0-9+_-`` → ``_``."""
    return re.sub(r"[^A-Za-z0-9+_-]+", "_", name).strip("_")


def _save_npz(path: Path, explanation: Explanation) -> Path:
    """One method's ``.npz`` in the one maps schema (:func:`evidencemap.io.save_explanation`,
    read back with :func:`evidencemap.io.load_maps`)."""
    written = io.save_explanation(path, explanation)
    if written is None:  # only for file objects
        raise CLIError(f"{path} was not written")
    return written


def _target_of(args: argparse.Namespace, loaded: Any, output: torch.Tensor) -> int:
    if args.target is not None:
        try:
            return int(loaded.class_index(args.target))
        except ValueError as err:
            raise CLIError(f"--target: {err}") from err
    if output.ndim != 2:
        raise CLIError("the model output is not (N, classes): give --target")
    return int(output.argmax(dim=1)[0])


def run(args: argparse.Namespace) -> int:
    """Run every method on the photo with one target; write the grid, maps and manifest."""
    device = setup_runtime(args)
    _check_args(args)
    loaded = model_from_args(args, device)
    if loaded.kind != "image" or is_embedding(loaded) or loaded.preprocess is None:
        raise CLIError("compare works on photos; use 'evidencemap explain' for volumes")
    picture = picture_settings(args, loaded.kind)
    methods = {name: build_method(name, loaded, args.layer, {}) for name in args.methods}
    base = output_bases([args.image], args.out)[0]
    item = prepare(args.image, base, loaded)
    x = item.tensor[None].to(device)
    with torch.no_grad():
        output = next(iter(methods.values())).forward(x)
    target = _target_of(args, loaded, output)
    predictions = top_predictions(output, loaded)[0]
    probability = float(torch.softmax(output.float(), dim=1)[0, target])
    label = loaded.label(target)
    compared = _explain_all(methods, x, target, loaded, item, args.cmap)
    title = f"{label} {probability:.2f} (class {target})"
    pictures = _write_pictures(args, item, loaded, compared, title, picture)
    npz = {
        name: _save_npz(base.with_name(f"{base.name}_compare_{_safe(name)}.npz"), explanation)
        for name, explanation in compared.explanations.items()
    }
    manifest_path = base.with_name(base.name + "_compare.json")
    io.save_json(
        manifest_path,
        {
            "input": str(args.image),
            **item.meta,
            "model": loaded.name,
            "model_source": loaded.source,
            "target": {"class": target, "label": label, "probability": probability},
            "predictions": predictions,
            "methods": [
                {
                    "method": name,
                    "label": explanation.label,
                    "layer": explanation.layer,
                    "seconds": compared.seconds[name],
                    "maps": str(npz[name]),
                }
                for name, explanation in compared.explanations.items()
            ],
            "warnings": item.warnings,
            "outputs": {
                "picture": str(pictures[0]),
                "pictures": [str(p) for p in pictures],
                "maps": {name: str(path) for name, path in npz.items()},
                "manifest": str(manifest_path),
            },
            "device": str(device),
            "versions": versions(),
        },
    )
    print(f"{args.image}: {label} ({probability:.2f}) → {pictures[0]}")
    return 0
