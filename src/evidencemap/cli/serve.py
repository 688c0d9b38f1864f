"""``evidencemap serve``: the web service and its page under uvicorn.

One process, one model shared by ``--workers`` explanation threads: ``--model`` takes every
form ``explain`` does (a built-in name, a TorchScript or pickled file, ``package.module:factory``
…, with ``--labels``, ``--input-size``, ``--resize``, ``--mean``, ``--std``). Torch's intra-op threads
are set to ``--torch-threads`` (default: CPU cores ÷ workers, at least 1) so concurrent
explanations do not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

from evidencemap.cli.common import CLIError, add_model_arguments, model_from_args, positive_int

__all__ = ["register", "run"]


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _niceness(text: str) -> int:
    if not text.strip().isdigit() or not 0 <= int(text) <= 19:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 19, got {text!r}")
    return int(text)


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 60, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object (sets ``func=run``)."""
    parser = subparsers.add_parser(
        "serve",
        help="start the web service and page",
        description="Serve POST /api/explain and an interactive page at / (see docs/server.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    add_model_arguments(parser)
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="threads computing explanations concurrently (default 2)",
    )
    parser.add_argument(
        "--costly-workers",
        type=positive_int,
        default=None,
        help="threads of the costly lane (FGVis, Score-CAM, Integrated Gradients, SmoothGrad), "
        "which pause while cheap requests compute (default: workers / 2, at least 1)",
    )
    parser.add_argument(
        "--costly-niceness",
        type=_niceness,
        default=19,
        metavar="N",
        help="niceness of the costly lane's threads, 0-19 (Linux): at 19 they run on the time "
        "cheap requests leave (19; 0: same priority)",
    )
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: CPU cores / workers, at least 1)",
    )
    parser.add_argument(
        "--max-upload-mb", type=_positive_float, default=10.0, help="largest file in MiB (10)"
    )
    parser.add_argument(
        "--max-megapixels", type=_positive_float, default=40.0, help="largest image in MP (40)"
    )
    parser.add_argument(
        "--cap",
        type=_cap,
        action="append",
        default=None,
        metavar="[METHOD.]OPTION=VALUE",
        help="largest accepted value of a costly option, e.g. max_iterations=200 or "
        "scorecam.top_k=256 (repeatable; see GET /api/methods for the defaults)",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=_positive_float,
        default=512.0,
        help="MiB one chunk of a method's computation may take per request (512)",
    )
    parser.add_argument(
        "--time-limit",
        type=_positive_float,
        default=120.0,
        help="seconds one request may compute before it is stopped (120)",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="another origin whose pages may POST, e.g. https://example.org (repeatable; "
        "default: same origin only)",
    )
    parser.add_argument(
        "--refusal-delay",
        type=_delay,
        default=0.5,
        metavar="SECONDS",
        help="seconds each refused request (400, 403, 413, 415, 422) waits once its client was "
        "refused more than --refusal-allowance times in 10 s; valid requests never wait "
        "(0.5; 0: off)",
    )
    parser.add_argument(
        "--refusal-allowance",
        type=positive_int,
        default=20,
        metavar="N",
        help="refusals per client address and 10 s answered at once (20)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    parser.set_defaults(func=run)


def _cap(text: str) -> tuple[str, float]:
    """``[METHOD.]OPTION=VALUE`` → ``(key, value)``."""
    key, sep, raw = text.partition("=")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not sep or not key.strip() or not value >= 0:
        raise argparse.ArgumentTypeError(f"expected [METHOD.]OPTION=NUMBER, got {text!r}")
    return key.strip(), value


def torch_threads_for(workers: int, requested: int | None = None) -> int:
    """Intra-op threads per process: ``requested``, else ``max(1, cores // workers)``."""
    if requested is not None:
        return requested
    return max(1, (os.cpu_count() or 1) // workers)


def run(args: argparse.Namespace) -> int:
    """Build the app and serve it until interrupted; 2 on a setup error.

    On SIGTERM or Ctrl-C the running explanations stop at their next checkpoint (503), the open
    requests end, and the process ends by that signal (uvicorn re-raises it).
    """
    try:
        import uvicorn

        from evidencemap.server import create_app
    except ImportError as err:
        print(
            f"evidencemap serve needs the serve extra ({err.name} is missing): "
            "pip install 'evidencemap[serve]'",
            file=sys.stderr,
        )
        return 2
    import torch

    threads = torch_threads_for(args.workers, args.torch_threads)
    torch.set_num_threads(threads)
    try:
        loaded = model_from_args(args, torch.device("cpu"))
        app = create_app(
            args.model,
            model=loaded,
            workers=args.workers,
            costly_workers=args.costly_workers,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            max_pixels=int(args.max_megapixels * 1_000_000),
            caps=dict(args.cap or []),
            memory_budget=int(args.memory_budget_mb * 2**20),
            time_limit=args.time_limit,
            allowed_origins=tuple(args.allow_origin or ()),
            refusal_delay=args.refusal_delay,
            refusal_allowance=args.refusal_allowance,
            costly_niceness=args.costly_niceness,
        )
    except (TypeError, ValueError, CLIError) as err:
        print(f"evidencemap serve: {err}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host}, reachable from other machines; the service has "
            "no authentication",
            file=sys.stderr,
        )
    print(
        f"evidencemap: {args.model} on http://{args.host}:{args.port}/ "
        f"({args.workers} workers, {threads} torch threads)",
        file=sys.stderr,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    server.handle_exit = partial(_stop_work_first, app.state.service.shutdown, server.handle_exit)
    server.run()
    return 0


def _stop_work_first(
    shutdown: threading.Event,
    handle_exit: Callable[[int, FrameType | None], None],
    sig: int,
    frame: FrameType | None,
) -> None:
    """uvicorn's SIGTERM / Ctrl-C handler, preceded by setting the service's ``shutdown`` event.

    Once it is set every running explanation stops at its next checkpoint and answers 503, and
    queued ones answer 503 before computing, so the open requests end within uvicorn's graceful
    period (3 s) instead of being cut off after it; uvicorn then ends the process by the same
    signal.
    """
    shutdown.set()
    handle_exit(sig, frame)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
