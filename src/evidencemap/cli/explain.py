"""``evidencemap explain IMAGE...``: an overlay, the maps and a manifest per input."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evidencemap.cli.common import (
    DEFAULT_OUT,
    CLIError,
    add_model_arguments,
    add_runtime_arguments,
    build_method,
    method_type,
    model_from_args,
    parse_option,
    parse_options,
    positive_int,
    setup_runtime,
    unit_float,
)
from evidencemap.cli.pipeline import Failure, Result, Settings, output_bases, run_inputs
from evidencemap.cli.progress import method_progress

__all__ = [
    "add_explain_arguments",
    "failure_text",
    "register",
    "run",
    "settings_from_args",
    "summary_line",
]

HELP = "explain photos or volumes: overlay PNG, maps .npz and JSON manifest per input"
EXAMPLES = """examples:
  evidencemap explain examples/chelsea.jpg --out evidencemap-out
  evidencemap explain photo.jpg --method gradcam++ --top-k 3
  evidencemap explain photo.jpg --target "tiger cat" --option counterfactual=true
  evidencemap explain scan.nii.gz --model mynet.py:build --window -1000,400
"""


def add_explain_arguments(parser: argparse.ArgumentParser, *, default_batch: int) -> None:
    """The options ``explain`` and ``batch`` share (method, targets, picture, model, runtime)."""
    parser.add_argument(
        "--method",
        type=method_type,
        default="gradcam",
        help="method name (default: gradcam; see 'evidencemap methods')",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--target",
        default=None,
        help="class to explain: an index or an exact label (default: the top class)",
    )
    which.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="explain each of the K top classes (one picture per class)",
    )
    parser.add_argument(
        "--layer", default=None, help="layer name(s) for layer methods, comma-separated"
    )
    parser.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --option relu=false",
    )
    parser.add_argument(
        "--game",
        choices=("preserve", "delete"),
        default=None,
        help="FGVis: the preservation or deletion game (sets the method's 'game' option)",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    parser.add_argument(
        "--opacity", type=unit_float, default=0.5, help="heat-map opacity in [0, 1] (0.5)"
    )
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap (default: jet)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_batch,
        help=f"inputs per explain call (default: {default_batch})",
    )
    add_model_arguments(parser)
    add_runtime_arguments(parser)


def register(subparsers: Any) -> None:
    """Add the ``explain`` command."""
    parser = subparsers.add_parser(
        "explain",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="photos (PNG, JPEG, TIFF, BMP, WebP) or volumes (.nii, .nii.gz, .npy, DICOM folder)",
    )
    add_explain_arguments(parser, default_batch=8)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, loaded: Any) -> Settings:
    """The method instance and picture settings the arguments ask for.

    Raises:
        CLIError: for a bad target, colormap, option or layer.
    """
    from matplotlib import colormaps

    if args.cmap not in colormaps:
        raise CLIError(f"--cmap: unknown matplotlib colormap {args.cmap!r}")
    options = parse_options(args.option)
    if args.game is not None:
        options["game"] = args.game
    target = None
    if args.target is not None:
        try:
            target = loaded.class_index(args.target)
        except ValueError as err:
            raise CLIError(f"--target: {err}") from err
    # --top-k repeats each input once per class: explain at most --batch-size of them at once
    method_options = {"batch_size": args.batch_size, **options} if args.top_k else options
    method = build_method(args.method, loaded, args.layer, method_options)
    return Settings(
        method=method,
        method_name=args.method,
        target=target,
        top_k=args.top_k,
        layer=args.layer,
        options=options,
        cmap=args.cmap,
        opacity=args.opacity,
        window=args.window,
    )


def summary_line(result: Result) -> str:
    """``file: label (probability) → picture`` for one input."""
    predicted = result.predicted
    if predicted is None:
        said = "no class output"
    else:
        said = f"{predicted['label']} ({predicted['probability']:.2f})"
    more = f" (+{len(result.pictures) - 1} more)" if len(result.pictures) > 1 else ""
    return f"{result.item.path}: {said} → {result.pictures[0]}{more}"


def failure_text(failure: Failure) -> str:
    """The failure's message, prefixed with its file when the message does not name it."""
    if str(failure.path) in failure.message:
        return failure.message
    return f"{failure.path}: {failure.message}"


def run(args: argparse.Namespace) -> int:
    """Explain every input; exit status 1 when some failed, else 0."""
    device = setup_runtime(args)
    loaded = model_from_args(args, device)
    settings = settings_from_args(args, loaded)
    paths = list(args.inputs)
    bases = output_bases(paths, args.out)
    failures: list[Failure] = []

    def done(result: Result) -> None:
        print(summary_line(result), flush=True)
        for text in result.warnings:
            print(f"evidencemap explain: warning: {result.item.path}: {text}", file=sys.stderr)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        print(f"evidencemap explain: {failure_text(failure)}", file=sys.stderr)

    with method_progress():
        run_inputs(paths, bases, loaded, settings, args.batch_size, done, failed)
    if failures:
        print(
            f"evidencemap explain: {len(failures)} of {len(paths)} input(s) failed",
            file=sys.stderr,
        )
        return 1
    return 0
