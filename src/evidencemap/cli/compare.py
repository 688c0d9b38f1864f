"""``evidencemap compare IMAGE --methods a,b,c``: one grid of several methods' maps."""

from __future__ import annotations

import argparse
import re
import time
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


def _explain_all(
    methods: dict[str, Any], x: torch.Tensor, target: int, loaded: Any, item: Any
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, float], dict]:
    """Each method's map on the photo: the panels (maps on the original photo), the maps at
    the model's resolution, the seconds and the layer of each."""
    pre = loaded.preprocess
    width, height = item.photo.size
    panels, maps, timings, layers = [], {}, {}, {}
    for name, method in methods.items():
        start = time.perf_counter()
        explanation = method(x, target)
        timings[name] = time.perf_counter() - start
        maps[name] = explanation.maps[0]
        layers[name] = explanation.layer
        shown = viz.for_display(explanation.maps[:1], explanation.raw[:1])
        on_photo = pre.to_original(shown, width, height)[0].clamp(0, 1)
        panels.append((explanation.label, on_photo))
    return panels, maps, timings, layers


def _write_pictures(
    args: argparse.Namespace,
    item: Any,
    loaded: Any,
    panels: list[tuple[str, torch.Tensor]],
    values: list[torch.Tensor],
    title: str,
    picture: dict[str, Any],
) -> list[Path]:
    """The grid figure (``NAME_compare.FORMAT``) or, with ``--bare``, one bare map per method
    (``NAME_compare_METHOD.png`` over the photo, or ``.tiff`` of the method's map ``values``
    at the model's input resolution)."""
    base = item.base
    width, height = item.photo.size
    region = crop_region(loaded, width, height)
    if not picture["bare"]:
        figure = viz.grid_plot(
            item.photo,
            panels,
            title=title,
            cmap=args.cmap,
            alpha=args.opacity,
            region=region,
            dpi=picture["dpi"],
            figsize=picture["figsize"],
        )
        path = base.with_name(f"{base.name}_compare.{picture['format']}")
        if picture["format"] == "png":  # RGB, rendered at the figure's dpi
            return [viz.save_png(viz.render(figure), path)]
        return [viz.save_figure(figure, path, picture["format"], picture["dpi"])]
    written = []
    for (name, heat), value in zip(panels, values, strict=True):
        safe = re.sub(r"[^A-Za-z0-9+_-]+", "_", name).strip("_")
        path = base.with_name(f"{base.name}_compare_{safe}.{picture['format']}")
        if picture["format"] == "tiff":
            written.append(viz.save_map(value, path, format="tiff"))
        else:
            written.append(
                viz.save_map(
                    heat,
                    path,
                    image=item.photo,
                    cmap=args.cmap,
                    alpha=args.opacity,
                    region=region,
                    format="png",
                )
            )
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
    panels, maps, timings, layers = _explain_all(methods, x, target, loaded, item)
    title = f"{label} {probability:.2f} (class {target})"
    pictures = _write_pictures(args, item, loaded, panels, list(maps.values()), title, picture)
    npz = io.save_maps(
        base.with_name(base.name + "_compare.npz"),
        **{name.replace("+", "p").replace("-", "_"): m for name, m in maps.items()},
    )
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
                {"method": name, "layer": layers[name], "seconds": timings[name]}
                for name in methods
            ],
            "warnings": item.warnings,
            "outputs": {
                "picture": str(pictures[0]),
                "pictures": [str(p) for p in pictures],
                "maps": str(npz),
                "manifest": str(manifest_path),
            },
            "device": str(device),
            "versions": versions(),
        },
    )
    print(f"{args.image}: {label} ({probability:.2f}) → {pictures[0]}")
    return 0
