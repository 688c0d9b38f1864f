"""``evidencemap methods``: every method, one line each."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["cost_text", "describe", "register", "run"]

HELP = "list the methods, one line each"


def describe(cls: type) -> str:
    """The first line of ``cls``'s docstring, without reStructuredText markup."""
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0].replace("``", "").rstrip(":") if doc else ""


def cost_text(name: str) -> str:
    """Method ``name``'s declared passes per class with its default options, in words:
    ``"1 layer pass"``, ``"≤300 input passes"``, ``"≤1/channel forward passes"`` (one per
    channel of the layer, which only a model tells)."""
    from evidencemap.methods import describe as describe_method

    spec = describe_method(name)
    passes, kind, at_most = spec.pass_count()
    bound = "≤" if at_most else ""
    if passes is None:
        count = "1/channel" if spec.passes.if_none == "channels" else "?"
        return f"{bound}{count} {kind} passes"
    return f"{bound}{passes:g} {kind} pass{'' if passes == 1 and not at_most else 'es'}"


def register(subparsers: Any) -> None:
    """Add the ``methods`` command."""
    parser = subparsers.add_parser("methods", help=HELP, description=HELP + ".")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print ``name  [layer|input]  passes  description  (aliases)`` per method."""
    from evidencemap.api import get_method, methods

    names = methods()
    width = max(len(n) for n in names)
    costs = {name: cost_text(name) for name in names}
    cost_width = max(len(text) for text in costs.values())
    for name in names:
        cls = get_method(name)
        where = "layer" if cls.uses_layer else "input"
        aliases = f"  (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"{name:<{width}}  [{where}]  {costs[name]:<{cost_width}}  {describe(cls)}{aliases}")
    return 0
