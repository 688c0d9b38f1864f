"""``evidencemap evaluate IMAGE... --methods ...``: every method × metric on a set of photos."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from evidencemap.cli.common import (
    CLIError,
    add_model_arguments,
    add_runtime_arguments,
    build_method,
    model_from_args,
    positive_int,
    setup_runtime,
)
from evidencemap.cli.progress import method_progress
from evidencemap.evaluation.inputs import QUICK_METHOD_OPTIONS

__all__ = ["DEFAULT_EVALUATION_OUT", "load_boxes", "parse_method_option", "register", "run"]

DEFAULT_EVALUATION_OUT = "evidencemap-evaluation"

HELP = "score methods with faithfulness, localisation, robustness and cost metrics"
EXAMPLES = """examples:
  evidencemap evaluate photos/*.jpg --quick
  evidencemap evaluate cat.png cup.png --methods gradcam,scorecam --boxes boxes.json
  evidencemap evaluate cat.png --metrics deletion,insertion --option scorecam:top_k=32

Writes summary.md / summary.csv (mean ± std per method and metric, ↑ higher / ↓ lower is
better), per_image.csv / per_image.json and the curves deletion_insertion.png and road.png.
By default every method that applies to the model runs (the others are named, with the
reason); a method that fails is reported, the others finish and are written (exit status 1).
Boxes file (JSON): {"cat.png": [[x0, y0, x1, y1, class], ...], ...} in the photo's pixels,
class an index or an exact label; it adds the pointing games. See docs/evaluation.md.
"""


def _name_list(text: str) -> list[str]:
    """argparse type: comma-separated names (no empty ones)."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def parse_method_option(text: str) -> tuple[str, str, Any]:
    """``METHOD:KEY=VALUE`` → ``(method, key, value)`` (values as in ``--option``).

    Raises:
        argparse.ArgumentTypeError: without ``:`` or ``=``, or with an invalid key.
    """
    from evidencemap.cli.common import parse_option

    method, sep, rest = text.partition(":")
    if not sep or not method.strip():
        raise argparse.ArgumentTypeError(
            f"options are METHOD:KEY=VALUE, e.g. scorecam:top_k=32, got {text!r}"
        )
    key, value = parse_option(rest)
    return method.strip(), key, value


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` command."""
    parser = subparsers.add_parser(
        "evaluate",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="photos (PNG, JPEG, TIFF, BMP, WebP); their file names must differ",
    )
    from evidencemap.metrics import get_metric, metric_names

    boxed = [m for m in metric_names() if "boxes" in get_metric(m).needs]
    parser.add_argument(
        "--methods",
        type=_name_list,
        default=None,
        help="comma-separated method names (default: every registered method that applies to "
        "the model; the others are named with the reason)",
    )
    parser.add_argument(
        "--metrics",
        type=_name_list,
        default=None,
        help=f"comma-separated metric names, of {', '.join(metric_names())} (default: all; "
        f"{', '.join(boxed)} need --boxes)",
    )
    parser.add_argument(
        "--metric-option",
        type=parse_method_option,
        action="append",
        default=None,
        metavar="METRIC:KEY=VALUE",
        help="metric option (repeatable), e.g. road:tol=1e-4 or deletion:steps=32; they "
        "override the protocol's (docs/metrics.md lists each metric's options)",
    )
    parser.add_argument(
        "--boxes", type=Path, default=None, help="JSON file of ground-truth boxes per image"
    )
    parser.add_argument(
        "--option",
        type=parse_method_option,
        action="append",
        default=None,
        metavar="METHOD:KEY=VALUE",
        help="method option (repeatable), e.g. scorecam:top_k=32 or gradcam:layer=_blocks.15",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(DEFAULT_EVALUATION_OUT), help="output folder"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short protocol (a few minutes for a few photos and methods on 2 CPU cores): 16 "
        "curve steps, ROAD at 25 and 75 %%, 2 randomisation stages, 2 sensitivity samples; "
        "fast options for slow methods ("
        + "; ".join(
            f"{method} " + ", ".join(f"{k}={v}" for k, v in opts.items())
            for method, opts in QUICK_METHOD_OPTIONS.items()
        )
        + ")",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="perturbed inputs per forward pass in the metrics (default: 32)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def load_boxes(
    path: Path, images: dict[str, tuple[Path, tuple[int, int]]], loaded: Any
) -> dict[str, list[list[Any]]]:
    """Read a boxes file and convert its boxes to model-input pixels.

    Args:
        path: JSON ``{file name: [[x0, y0, x1, y1, class], …]}`` in original photo pixels;
            ``class`` an index or an exact label; a key may also be the path as given.
        images: image name → (path, (width, height) of the photo).
        loaded: the loaded model (its preprocessing gives the crop, its labels the classes).

    Returns:
        image name → boxes ``[x0, y0, x1, y1, class index]`` in model-input pixels (only the
        images that have boxes).

    Raises:
        CLIError: for an unreadable or malformed file, unknown labels, boxes outside the crop,
            or a file that names none of the images.
    """
    from evidencemap.evaluation import to_input_boxes

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CLIError(f"--boxes: file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"--boxes: {path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CLIError(
            f"--boxes: {path} must hold a JSON object {{image file name: [[x0, y0, x1, y1, "
            f"class], ...]}}, got {type(data).__name__}"
        )
    by_key: dict[str, str] = {}
    for name, (image_path, _) in images.items():
        for key in (name, str(image_path)):
            by_key[key] = name
    out: dict[str, list[list[Any]]] = {}
    for key, entries in data.items():
        if key not in by_key:
            continue
        name = by_key[key]
        if not isinstance(entries, list):
            raise CLIError(f"--boxes: {key!r} must map to a list of [x0, y0, x1, y1, class]")
        width, height = images[name][1]
        converted = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 5:
                raise CLIError(
                    f"--boxes: {key!r}: entries must be [x0, y0, x1, y1, class], got {entry!r}"
                )
            cls = entry[4]
            if isinstance(cls, str):
                try:
                    cls = loaded.class_index(cls)
                except ValueError as err:
                    raise CLIError(f"--boxes: {key!r}: {err}") from None
            converted.append([*entry[:4], cls])
        try:
            crop = loaded.preprocess.crop_box(width, height)
            out[name] = to_input_boxes(converted, crop, name)
        except ValueError as err:
            raise CLIError(f"--boxes: {err}") from None
    if not out:
        raise CLIError(f"--boxes: {path} names none of the images ({', '.join(images)})")
    ignored = len([k for k in data if k not in by_key])
    if ignored:
        print(
            f"evidencemap evaluate: {ignored} entr{'y' if ignored == 1 else 'ies'} of {path} "
            "name no image given here (ignored)",
            file=sys.stderr,
        )
    return out


def _method_options(
    args: argparse.Namespace, methods: list[str], others: list[str], loaded: Any
) -> dict[str, Any]:
    """``--option`` as method → options, checked against what each method takes (the
    ``methods`` that run are built once; options of ``others``, left out, are dropped)."""
    from evidencemap.methods import describe

    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option or []:
        try:
            spec = describe(method)
        except ValueError as err:
            raise CLIError(f"--option: {err}") from None
        if spec.name in others:
            continue
        if spec.name not in methods:
            raise CLIError(f"--option: {method!r} is not among the methods evaluated")
        options.setdefault(spec.name, {})[key] = value
    for name in methods:  # every option and the model checked now, before any work
        given = dict(options.get(name, {}))
        build_method(name, loaded, given.pop("layer", None), given)
    return options


def _metrics(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """``--metrics`` and ``--metric-option`` checked against the registry (before any work)."""
    from evidencemap.evaluation import default_metrics, evaluation_settings
    from evidencemap.metrics import get_metric, metric_names

    metrics = args.metrics
    if metrics is not None:
        unknown = [m for m in metrics if m not in metric_names()]
        if unknown:
            raise CLIError(
                f"--metrics: unknown metric(s) {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(metric_names())}"
            )
        boxed = [m for m in metrics if "boxes" in get_metric(m).needs]
        if boxed and args.boxes is None:
            raise CLIError(f"--metrics {', '.join(boxed)} need --boxes FILE")
    options: dict[str, dict[str, Any]] = {}
    for metric, key, value in args.metric_option or []:
        options.setdefault(metric, {})[key] = value
    chosen = metrics if metrics is not None else default_metrics(args.boxes)
    try:
        evaluation_settings(chosen, quick=args.quick, given=options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"--metric-option: {err}") from None
    return metrics, options


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A method's warning as one line on stderr, without Python's source-line dump."""
    print(f"evidencemap evaluate: warning: {category.__name__}: {message}", file=sys.stderr)


def _report(results: Any) -> int:
    """Print the table and what was left out or failed; the exit status."""
    print(results.to_markdown(), end="")
    for method, why in results.skipped.items():
        print(f"evidencemap evaluate: left out {method}: {why}", file=sys.stderr)
    for method, error in results.failed.items():
        print(f"evidencemap evaluate: {method} FAILED: {error}", file=sys.stderr)
    if results.files:
        print(f"evidencemap evaluate: wrote {', '.join(str(f) for f in results.files)}")
    return 1 if results.failed else 0


def run(args: argparse.Namespace) -> int:
    """Evaluate; exit status 0 when every method ran and the tables were written, 1 when a
    method failed (the others' tables are written)."""
    from evidencemap import io
    from evidencemap.evaluation import evaluate
    from evidencemap.evaluation.inputs import select_methods
    from evidencemap.methods import get_method

    paths = list(args.images)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CLIError(f"image file(s) not found: {', '.join(missing)}", status=1)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise CLIError("the images' file names must differ (they name the rows of the tables)")
    try:
        methods = [get_method(m).name for m in args.methods] if args.methods else None
    except ValueError as err:
        raise CLIError(f"--methods: {err}") from None
    metrics, metric_options = _metrics(args)
    device = setup_runtime(args)
    loaded = model_from_args(args, device)
    if loaded.kind != "image" or loaded.preprocess is None:
        raise CLIError(
            f"evaluate takes photos and an image model; {loaded.name} takes {loaded.kind}s "
            "(evaluate volumes with evidencemap.evaluation.evaluate in Python)"
        )
    run_methods, skipped, refused = select_methods(loaded.module, methods)
    options = _method_options(args, run_methods, [*skipped, *refused], loaded)
    images, sizes = [], {}
    for path in paths:
        try:
            photo = io.load_image(path)
        except (OSError, ValueError) as err:
            raise CLIError(str(err) if str(path) in str(err) else f"{path}: {err}", 1) from None
        sizes[path.name] = (path, photo.size)
        images.append((path.name, loaded.preprocess(photo).to(device)))
    boxes = None if args.boxes is None else load_boxes(args.boxes, sizes, loaded)
    with (
        method_progress(False if args.quiet else None),  # FGVis iterations, Score-CAM chunks
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("always")  # the runner issues each distinct one once per image
        warnings.showwarning = _print_warning
        results = evaluate(
            loaded.module,
            images,
            methods,
            metrics,
            boxes,
            quick=args.quick,
            progress=not args.quiet,
            out_dir=args.out,
            method_options=options,
            device=device,
            batch_size=args.batch_size,
            seed=args.seed,
            metric_options=metric_options,
        )
    return _report(results)
