"""``evidencemap methods``: every method, one line each."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["describe", "register", "run"]

HELP = "list the methods, one line each"


def describe(cls: type) -> str:
    """The first line of ``cls``'s docstring, without reStructuredText markup."""
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0].replace("``", "").rstrip(":") if doc else ""


def register(subparsers: Any) -> None:
    """Add the ``methods`` command."""
    parser = subparsers.add_parser("methods", help=HELP, description=HELP + ".")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print ``name  [layer|input]  description  (aliases)`` per method."""
    from evidencemap.api import get_method, methods

    names = methods()
    width = max(len(n) for n in names)
    for name in names:
        cls = get_method(name)
        where = "layer" if cls.uses_layer else "input"
        aliases = f"  (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"{name:<{width}}  [{where}]  {describe(cls)}{aliases}")
    return 0
