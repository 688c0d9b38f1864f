"""``evidencemap batch DIR --out DIR``: every input under a folder, in real batches, resumable."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evidencemap import io
from evidencemap.cli.common import CLIError, model_from_args, positive_int, setup_runtime
from evidencemap.cli.explain import (
    add_explain_arguments,
    check_args,
    failure_text,
    settings_from_args,
)
from evidencemap.cli.progress import method_progress
from evidencemap.engine import Failure, Settings, already_done, output_bases, run_inputs

__all__ = ["register", "run"]

HELP = "explain every photo (or volume, for a 3-D model) under a folder; resumable"
EXAMPLES = """examples:
  evidencemap batch photos/ --out maps/ --batch-size 16
  evidencemap batch scans/ --out maps/ --model mynet:build3d --method gradcam
  evidencemap batch /shared/photos --out /shared/maps --engine ray --address auto
  evidencemap batch /shared/photos --out /shared/maps --engine ray --gpus-per-actor 0.5

Outputs mirror the input folder. An input whose manifest (NAME_METHOD.json, with _tTARGET and
_oHASH suffixes for a target or options other than the defaults) is already in the output
folder and records the same request (model, method, target, options) is skipped, so an
interrupted run continues where it stopped and a run with other settings computes anew.
Unreadable files are reported on stderr and skipped; the exit status is 1 when some failed.

--engine ray (pip install 'evidencemap[ray]') runs the same batches on a Ray cluster with the
same outputs: a local one unless --address names one; inputs and outputs must then be on
storage every node sees (docs/distributed.md).
"""


def register(subparsers: Any) -> None:
    """Add the ``batch`` command."""
    parser = subparsers.add_parser(
        "batch",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="folder searched recursively")
    add_explain_arguments(parser, default_batch=16)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (errors and the summary remain)"
    )
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: actors on a Ray cluster (evidencemap[ray])",
    )
    group.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join (auto, or ray://HOST:10001; default: start a local one)",
    )
    group.add_argument(
        "--actors",
        type=positive_int,
        default=None,
        help="ray: actors, each with its own model (default: as many as the cluster fits)",
    )
    group.add_argument(
        "--cpus-per-actor",
        type=positive_float,
        default=1.0,
        help="ray: CPUs each actor reserves (default 1; torch threads follow unless --threads)",
    )
    group.add_argument(
        "--gpus-per-actor",
        type=non_negative_float,
        default=0.0,
        help="ray: GPUs each actor reserves, e.g. 0.5 (> 0: the actors explain on CUDA)",
    )
    parser.set_defaults(func=run)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _check_engine(args: argparse.Namespace) -> None:
    """Refuse engine options that do not go together, before any work."""
    ray_only = {
        "--address": args.address is not None,
        "--actors": args.actors is not None,
        "--cpus-per-actor": args.cpus_per_actor != 1.0,
        "--gpus-per-actor": args.gpus_per_actor != 0.0,
    }
    if args.engine == "local":
        given = [name for name, set_ in ray_only.items() if set_]
        if given:
            raise CLIError(f"{', '.join(given)}: only with --engine ray")
        return
    if str(args.device).strip().lower() != "cpu":
        raise CLIError(
            "--engine ray explains on the actors' devices: give --gpus-per-actor F for CUDA "
            "actors instead of --device"
        )
    from evidencemap.distributed import import_ray

    try:
        import_ray()
    except ImportError as err:
        raise CLIError(str(err), status=1) from None


def _run_on_ray(
    args: argparse.Namespace,
    todo: list[Path],
    bases: list[Path],
    on_done: Callable[[str], None],
    on_failure: Callable[[Failure], None],
) -> str:
    """Explain ``todo`` with ``--engine ray``; the description of the actor pool."""
    from evidencemap.distributed import BatchSpec, run_on_ray

    spec = BatchSpec(
        model=args.model,
        method=args.method,
        target=args.target,
        top_k=args.top_k,
        layer=args.layer,
        options=dict(args.option or []),
        game=args.game,
        cmap=args.cmap,
        opacity=args.opacity,
        dpi=args.dpi,
        figsize=args.figsize,
        format=args.format,
        bare=args.bare,
        batch_size=args.batch_size,
        device="cuda" if args.gpus_per_actor > 0 else "cpu",
        threads=args.threads or max(1, int(args.cpus_per_actor)),
        labels=None if args.labels is None else str(args.labels),
        input_size=args.input_size,
        resize=args.resize,
        mean=args.mean,
        std=args.std,
        window=args.window,
        frame=args.frame,
        workdir=os.getcwd(),
    )
    try:
        pool = run_on_ray(
            todo,
            bases,
            spec,
            on_done,
            on_failure,
            address=args.address,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        )
    except ValueError as err:
        raise CLIError(str(err)) from err
    return f"engine ray, {pool.describe()}"


def run(args: argparse.Namespace) -> int:
    """Explain everything new under the folder; exit status 1 when some input failed."""
    start = time.perf_counter()
    if not args.folder.is_dir():
        raise CLIError(f"{args.folder} is not a folder")
    _check_engine(args)
    device = setup_runtime(args)
    check_args(args, [args.folder])
    loaded = model_from_args(args, device)
    settings: Settings = settings_from_args(args, loaded)
    results_folder = args.out.resolve()
    found = [  # results written inside the input folder are not inputs
        p for p in io.find_inputs(args.folder) if not p.resolve().is_relative_to(results_folder)
    ]
    if not found:
        print(f"evidencemap batch: no photos or volumes under {args.folder}", file=sys.stderr)
    wanted = [p for p in found if io.is_volume_path(p) == (loaded.kind == "volume")]
    ignored = len(found) - len(wanted)
    bases = output_bases(wanted, args.out, root=args.folder)
    todo, todo_bases, skipped = [], [], 0
    for path, base in zip(wanted, bases, strict=True):
        if already_done(base, settings, loaded):
            skipped += 1
        else:
            todo.append(path)
            todo_bases.append(base)

    done = 0
    failures: list[Failure] = []
    bar = tqdm(total=len(todo), unit="input", disable=args.quiet or None, file=sys.stderr)

    def finished(_: object) -> None:
        nonlocal done
        done += 1
        bar.update(1)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        bar.update(1)
        tqdm.write(f"evidencemap batch: {failure_text(failure)}", file=sys.stderr)

    engine = ""
    try:
        if args.engine == "ray":
            engine = "; " + _run_on_ray(args, todo, todo_bases, finished, failed)
        else:
            with method_progress(False if args.quiet else None):
                run_inputs(todo, todo_bases, loaded, settings, args.batch_size, finished, failed)
    finally:
        bar.close()
    other = "photos" if loaded.kind == "volume" else "volumes"
    parts = [
        f"done {done}",
        f"skipped {skipped} (already in {args.out})",
        f"failed {len(failures)}",
    ]
    if ignored:
        parts.append(f"ignored {ignored} {other} ({loaded.name} takes {loaded.kind}s)")
    seconds = time.perf_counter() - start
    print(f"evidencemap batch: {', '.join(parts)}; {seconds:.1f} s{engine}")
    return 1 if failures else 0
