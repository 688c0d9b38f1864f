"""``evidencemap compare IMAGE --methods a,b,c``: one grid of several methods' maps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from evidencemap import io, viz
from evidencemap.cli.common import (
    DEFAULT_OUT,
    CLIError,
    add_model_arguments,
    add_runtime_arguments,
    build_method,
    method_type,
    model_from_args,
    setup_runtime,
    unit_float,
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
    parser.add_argument(
        "--opacity", type=unit_float, default=0.5, help="heat-map opacity in [0, 1] (0.5)"
    )
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap (default: jet)")
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
    if not args.image.exists():
        raise CLIError(f"{args.image}: no such file")


def run(args: argparse.Namespace) -> int:
    """Run every method on the photo with one target; write the grid, maps and manifest."""
    device = setup_runtime(args)
    _check_args(args)
    loaded = model_from_args(args, device)
    if loaded.kind != "image" or is_embedding(loaded):
        raise CLIError("compare works on photos; use 'evidencemap explain' for volumes")
    methods = {name: build_method(name, loaded, args.layer, {}) for name in args.methods}
    base = output_bases([args.image], args.out)[0]
    item = prepare(args.image, base, loaded)
    x = item.tensor[None].to(device)
    with torch.no_grad():
        output = next(iter(methods.values())).forward(x)
    if args.target is not None:
        try:
            target = loaded.class_index(args.target)
        except ValueError as err:
            raise CLIError(f"--target: {err}") from err
    else:
        if output.ndim != 2:
            raise CLIError("the model output is not (N, classes): give --target")
        target = int(output.argmax(dim=1)[0])
    predictions = top_predictions(output, loaded)[0]
    probability = float(torch.softmax(output.float(), dim=1)[0, target])
    label = loaded.label(target)

    pre = loaded.preprocess
    if pre is None or item.photo is None:
        raise CLIError("compare needs an image model with preprocessing")
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
        panels.append((name, on_photo))
    title = f"{label} {probability:.2f} (class {target})"
    picture = viz.grid(
        item.photo,
        panels,
        title=title,
        cmap=args.cmap,
        alpha=args.opacity,
        region=crop_region(loaded, width, height),
    )
    png = viz.save_png(picture, base.with_name(base.name + "_compare.png"))
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
            "outputs": {"picture": str(png), "maps": str(npz), "manifest": str(manifest_path)},
            "device": str(device),
            "versions": versions(),
        },
    )
    print(f"{args.image}: {label} ({probability:.2f}) → {png}")
    return 0
