"""``evidencemap batch DIR --out DIR``: every input under a folder, in real batches, resumable."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evidencemap import io
from evidencemap.cli.common import CLIError, model_from_args, setup_runtime
from evidencemap.cli.explain import add_explain_arguments, failure_text, settings_from_args
from evidencemap.cli.pipeline import Failure, Result, output_bases, run_inputs
from evidencemap.cli.progress import method_progress

__all__ = ["register", "run"]

HELP = "explain every photo (or volume, for a 3-D model) under a folder; resumable"
EXAMPLES = """examples:
  evidencemap batch photos/ --out maps/ --batch-size 16
  evidencemap batch scans/ --out maps/ --model mynet:build3d --method gradcam

Outputs mirror the input folder. An input whose manifest (NAME_METHOD.json) is already in the
output folder is skipped, so an interrupted run continues where it stopped. Unreadable files are
reported on stderr and skipped; the exit status is 1 when some failed.
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Explain everything new under the folder; exit status 1 when some input failed."""
    start = time.perf_counter()
    if not args.folder.is_dir():
        raise CLIError(f"{args.folder} is not a folder")
    device = setup_runtime(args)
    loaded = model_from_args(args, device)
    settings = settings_from_args(args, loaded)
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
        if base.with_name(f"{base.name}_{settings.method_name}.json").exists():
            skipped += 1
        else:
            todo.append(path)
            todo_bases.append(base)

    done: list[Result] = []
    failures: list[Failure] = []
    bar = tqdm(total=len(todo), unit="input", disable=args.quiet or None, file=sys.stderr)

    def finished(result: Result) -> None:
        done.append(result)
        bar.update(1)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        bar.update(1)
        tqdm.write(f"evidencemap batch: {failure_text(failure)}", file=sys.stderr)

    try:
        with method_progress(False if args.quiet else None):
            run_inputs(todo, todo_bases, loaded, settings, args.batch_size, finished, failed)
    finally:
        bar.close()
    other = "photos" if loaded.kind == "volume" else "volumes"
    parts = [
        f"done {len(done)}",
        f"skipped {skipped} (already in {args.out})",
        f"failed {len(failures)}",
    ]
    if ignored:
        parts.append(f"ignored {ignored} {other} ({loaded.name} takes {loaded.kind}s)")
    seconds = time.perf_counter() - start
    print(f"evidencemap batch: {', '.join(parts)}; {seconds:.1f} s")
    return 1 if failures else 0
