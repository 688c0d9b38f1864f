"""``evidencemap methods [NAME ...]``: every method, one line each; or the options of some."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["cost_text", "describe", "kind_label", "options_text", "register", "run"]

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
    parser = subparsers.add_parser(
        "methods",
        help=HELP,
        description=HELP + "; with names, each one's options (type, default, range, cost, cap).",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="methods whose options to show (or aliases)"
    )
    parser.set_defaults(func=run)


def options_text(name: str) -> list[str]:
    """Lines describing method ``name``: its summary and passes, then one line per option:
    ``name  expected  default  [cost, cap]  doc``."""
    from evidencemap.methods import describe as describe_method
    from evidencemap.methods.base import Method

    spec = describe_method(name)
    lines = [f"{spec.name}: {spec.summary}", f"  cost: {cost_text(spec.name)} per class", ""]
    shared = {o.name for o in Method.OPTIONS}
    rows = []
    for option in spec.options.values():
        if option.name in shared:
            continue
        cost = f"cost={option.cost}" + (f", cap {option.cap:g}" if option.cap is not None else "")
        rows.append(
            (
                option.name,
                option.expected(),
                repr(option.default),
                cost if option.cost else "",
                option.doc,
            )
        )
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        lines.append("  " + "  ".join(cells) + "  " + row[4])
    lines.append(
        "  (and, like every method: " + ", ".join(sorted(shared)) + "; see evidencemap.describe)"
    )
    return lines


def kind_label(name: str) -> str:
    """``[layer]``, ``[input]``, ``[attention]`` or ``[wraps METHOD]`` (the wrapped method's
    default) for method ``name``, from its declared capabilities
    (:attr:`evidencemap.methods.MethodSpec.kind`)."""
    from evidencemap.methods import describe as describe_method

    spec = describe_method(name)
    if spec.kind == "wrapper":
        default = spec.options[spec.forwards_to].default
        return f"[wraps {default if isinstance(default, str) else 'a method'}]"
    return f"[{spec.kind}]"


def run(args: argparse.Namespace) -> int:
    """Print ``name  [kind]  passes  description  (aliases)`` per method (kind: layer, input,
    attention, or ``wraps METHOD``), or with ``args.names`` each named method's options (an
    unknown name: exit status 2)."""
    from evidencemap.api import get_method, methods

    if getattr(args, "names", None):
        try:
            blocks = [options_text(name) for name in args.names]
        except (KeyError, ValueError) as err:
            print(f"evidencemap methods: {err}", file=sys.stderr)
            return 2
        print("\n\n".join("\n".join(block) for block in blocks))
        return 0

    names = methods()
    width = max(len(n) for n in names)
    costs = {name: cost_text(name) for name in names}
    cost_width = max(len(text) for text in costs.values())
    kinds = {name: kind_label(name) for name in names}
    kind_width = max(len(text) for text in kinds.values())
    for name in names:
        cls = get_method(name)
        aliases = f"  (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(
            f"{name:<{width}}  {kinds[name]:>{kind_width}}  {costs[name]:<{cost_width}}  "
            f"{describe(cls)}{aliases}"
        )
    return 0
