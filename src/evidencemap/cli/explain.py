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
    add_picture_arguments,
    add_runtime_arguments,
    method_type,
    model_from_args,
    parse_option,
    parse_options,
    picture_settings,
    positive_int,
    setup_runtime,
)
from evidencemap.cli.progress import method_progress
from evidencemap.engine import (
    Failure,
    Result,
    Settings,
    check_request,
    make_settings,
    output_bases,
    run_inputs,
)

__all__ = [
    "add_explain_arguments",
    "check_args",
    "failure_text",
    "non_negative_int",
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
  evidencemap explain photo.jpg --format pdf --dpi 300 --figsize 4,3
  evidencemap explain photo.jpg --bare --format tiff
  evidencemap explain scan.nii.gz --model mynet:build --window -1000,400
  evidencemap explain fmri.nii.gz --model ct-i3resnet152 --frame 0 --input-size 64,64,48
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
        help="what to explain: a class index or an exact label (default: the top class); "
        "'norm' (the L2 norm of an embedding, the default of embedding models such as "
        "ct-i3resnet152); or package.module:function, a function from the model output "
        "(N, ...) to (N,) scores",
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
        choices=("preserve", "delete", "dual"),
        default=None,
        help=(
            "the method's 'game' option: FGVis and extremal perturbation keep (preserve) or "
            "remove (delete) the evidence; 'dual' (extremal perturbation only) plays both"
        ),
    )
    parser.add_argument(
        "--frame",
        type=non_negative_int,
        default=None,
        help="volumes: the frame of a 4-D file (its 4th axis) to explain, from 0",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_batch,
        help=f"inputs per explain call (default: {default_batch})",
    )
    add_picture_arguments(parser)
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


def non_negative_int(text: str) -> int:
    """argparse type: an int ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = parse_options(args.option)
    if args.game is not None:
        options["game"] = args.game
    return options


def check_args(args: argparse.Namespace, inputs: list[Path]) -> None:
    """Check what can be checked before the model is loaded (which takes seconds): the
    method's options, ``--cmap``, ``--target`` (its class range for built-in models or with
    ``--labels``) and that the ``inputs`` exist.

    Raises:
        CLIError: naming the argument and what is accepted.
    """
    try:
        check_request(args.method, _options(args), cmap=args.cmap, frame=args.frame)
    except (TypeError, ValueError) as err:
        flag = "--cmap: " if "colormap" in str(err) else ""
        raise CLIError(f"{flag}{err}") from err
    try:
        check_request(
            args.method,
            model=args.model,
            target=args.target,
            top_k=args.top_k,
            labels=args.labels,
        )
    except FileNotFoundError as err:
        raise CLIError(f"--labels: {err}") from err
    except (TypeError, ValueError) as err:
        text = str(err)
        if text.startswith("top_k: "):
            raise CLIError(f"--top-k: {text[len('top_k: ') :]}") from err
        raise CLIError(f"--target: {text}") from err
    picture_settings(args)
    missing = [str(p) for p in inputs if not p.exists()]
    if missing and len(missing) == len(inputs):
        raise CLIError(f"no such file: {', '.join(missing)}")


def settings_from_args(args: argparse.Namespace, loaded: Any) -> Settings:
    """The method instance and picture settings the arguments ask for
    (:func:`evidencemap.engine.make_settings`).

    Raises:
        CLIError: for a bad target, colormap, option or layer.
    """
    try:
        return make_settings(
            loaded,
            args.method,
            target=args.target,
            top_k=args.top_k,
            layer=args.layer,
            options=parse_options(args.option),
            game=args.game,
            cmap=args.cmap,
            opacity=args.opacity,
            **picture_settings(args, loaded.kind),
            window=args.window,
            frame=getattr(args, "frame", None),
            batch_size=args.batch_size,
        )
    except (TypeError, ValueError) as err:
        text = str(err)
        if "colormap" in text:
            text = f"--cmap: {text}"
        elif text.startswith(("target", "top_k")):
            text = f"--{text.replace('top_k', 'top-k')}"
        raise CLIError(text.replace("takes no layer", "takes no --layer")) from err


def summary_line(result: Result) -> str:
    """``file: label (probability) → picture`` for one input: the explained target (the first
    of them with ``--top-k``), with its probability, or its score when it has none."""
    explained = result.targets[0] if result.targets else result.predicted
    if explained is None:
        said = "no class output"
    elif explained.get("probability") is not None:
        said = f"{explained['label']} ({explained['probability']:.2f})"
    else:
        said = f"{explained['label']} (score {explained['score']:.3g})"
    more = f" (+{len(result.pictures) - 1} more)" if len(result.pictures) > 1 else ""
    return f"{result.item.path}: {said} → {result.pictures[0]}{more}"


def failure_text(failure: Failure) -> str:
    """The failure's message, prefixed with its file when the message does not name it."""
    if str(failure.path) in failure.message:
        return failure.message
    return f"{failure.path}: {failure.message}"


def run(args: argparse.Namespace) -> int:
    """Explain every input; exit status 1 when some failed, else 0.

    Everything that can be checked without the model is checked first (a missing input is
    reported before the model loads).
    """
    device = setup_runtime(args)
    paths = list(args.inputs)
    check_args(args, paths)
    failures: list[Failure] = []

    def done(result: Result) -> None:
        print(summary_line(result), flush=True)
        for text in result.warnings:
            print(f"evidencemap explain: warning: {result.item.path}: {text}", file=sys.stderr)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        print(f"evidencemap explain: {failure_text(failure)}", file=sys.stderr)

    todo = []
    for path in paths:
        if path.exists():
            todo.append(path)
        else:
            failed(Failure(path, f"{path}: no such file"))
    loaded = model_from_args(args, device)
    settings = settings_from_args(args, loaded)
    with method_progress():
        run_inputs(
            todo, output_bases(todo, args.out), loaded, settings, args.batch_size, done, failed
        )
    if failures:
        print(
            f"evidencemap explain: {len(failures)} of {len(paths)} input(s) failed",
            file=sys.stderr,
        )
        return 1
    return 0
