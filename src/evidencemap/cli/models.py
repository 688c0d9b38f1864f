"""``evidencemap models``: the built-in models and the other accepted ``--model`` forms."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

__all__ = ["register", "run"]

HELP = "list the built-in models (installed or not) and the accepted --model forms"


def register(subparsers: Any) -> None:
    """Add the ``models`` command."""
    parser = subparsers.add_parser("models", help=HELP, description=HELP + ".")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per built-in model, then the accepted forms."""
    from evidencemap import models
    from evidencemap.models.loading import MODEL_FORMS

    installed = set(models.available())
    names = models.builtin_names()
    width = max(len(n) for n in names)
    for name in names:
        state = "installed" if name in installed else "not installed"
        print(f"{name:<{width}}  {state:<13}  {models.describe(name)}")
    print("accepted --model forms:")
    for form in MODEL_FORMS:
        print(f"  {form}")
    for package in ("torchvision", "timm"):
        found = importlib.util.find_spec(package) is not None
        print(f"  {package}: {'installed' if found else 'not installed'}")
    return 0
