"""The ``evidencemap`` command: ``evidencemap COMMAND --help`` for each command.

Each command lives in its own module of this package with ``register(subparsers)`` (adds its
parser and sets ``func=run``) and ``run(args) -> int`` (the exit status). :data:`COMMANDS` lists
them in the order ``--help`` shows them.

Exit status: 0 success; 1 some inputs failed or an error occurred while running; 2 bad
arguments (usage errors); 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
from types import ModuleType

from evidencemap.cli import batch, compare, evaluate, explain, methods, models, serve
from evidencemap.cli.common import CLIError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (explain, compare, batch, evaluate, methods, models, serve)
"""The command modules, in the order the help lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    import evidencemap

    parser = argparse.ArgumentParser(
        prog="evidencemap",
        description="Maps of the evidence a convolutional network used for its decision.",
        epilog="first run: evidencemap explain examples/chelsea.jpg --out evidencemap-out",
    )
    parser.add_argument("--version", action="version", version=evidencemap.__version__)
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


# Options whose value may start with a minus sign (argparse would take "-1000,400" for an option).
_NEGATIVE_VALUED = ("--window", "--mean")
_NUMBERS = re.compile(r"-[\d.]+(,-?[\d.]+)*")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--window -1000,400`` → ``--window=-1000,400`` (what argparse accepts)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _NEGATIVE_VALUED and i + 1 < len(argv) and _NUMBERS.fullmatch(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    name = f"evidencemap {args.command}"
    try:
        return int(args.func(args))
    except CLIError as err:
        if args.debug:
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        return err.status
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"{name}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
