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

__all__ = ["config_from_args", "register", "run"]

MIB = 2**20


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def _setting(name: str, unit: float = 1.0) -> Callable[[str], Any]:
    """argparse type of the service setting ``name``: checked by the setting's own
    description (:func:`evidencemap.server.config.parse_setting`), not here."""

    def parse(text: str) -> Any:
        try:
            from evidencemap.server.config import parse_setting
        except ImportError:  # no serve extra: run() says so
            return text
        try:
            return parse_setting(name, text, unit)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


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
        "--device",
        type=_setting("device"),
        default="cpu",
        help="where the model runs: cpu, cuda, cuda:N or mps (default cpu); an error when this "
        "machine does not have it",
    )
    _add_lane_arguments(parser)
    _add_limit_arguments(parser)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    parser.set_defaults(func=run)


def _add_lane_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--costly-workers``, ``--costly-niceness``, ``--torch-threads``."""
    parser.add_argument(
        "--workers",
        type=_setting("workers"),
        default=2,
        help="threads computing explanations concurrently (default 2)",
    )
    parser.add_argument(
        "--costly-workers",
        type=_setting("costly_workers"),
        default=None,
        help="threads of the costly lane (FGVis, Score-CAM, Integrated Gradients, SmoothGrad), "
        "which pause while cheap requests compute (default: workers / 2, at least 1)",
    )
    parser.add_argument(
        "--costly-niceness",
        type=_setting("costly_niceness"),
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


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limits: upload, pixels, caps, memory, time, origins, refusals."""
    parser.add_argument(
        "--max-upload-mb",
        type=_setting("max_upload_bytes", MIB),
        default=10.0,
        help="largest file in MiB (10)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=_setting("max_pixels", 1e6),
        default=40.0,
        help="largest image in MP (40)",
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
        type=_setting("memory_budget", MIB),
        default=512.0,
        help="MiB one chunk of a method's computation may take per request (512)",
    )
    parser.add_argument(
        "--time-limit",
        type=_setting("time_limit"),
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
        type=_setting("refusal_delay"),
        default=0.5,
        metavar="SECONDS",
        help="seconds each refused request (400, 403, 413, 415, 422) waits once its client was "
        "refused more than --refusal-allowance times in 10 s; valid requests never wait "
        "(0.5; 0: off)",
    )
    parser.add_argument(
        "--refusal-allowance",
        type=_setting("refusal_allowance"),
        default=20,
        metavar="N",
        help="refusals per client address and 10 s answered at once (20)",
    )


def _cap(text: str) -> tuple[str, float]:
    """``[METHOD.]OPTION=VALUE`` → ``(key, value)``, checked by
    :func:`evidencemap.server.config.check_cap`."""
    key, sep, raw = text.partition("=")
    try:
        value = float(raw)
    except ValueError:
        sep = ""
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected [METHOD.]OPTION=NUMBER, got {text!r}")
    try:
        from evidencemap.server.config import check_cap
    except ImportError:  # no serve extra: run() says so
        return key.strip(), value
    try:
        return key.strip(), check_cap(key.strip(), value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected [METHOD.]OPTION=NUMBER >= 0: {err}") from None


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~evidencemap.server.config.ServiceConfig` of the parsed flags (their values
    were checked as they were read)."""
    from evidencemap.server.config import ServiceConfig

    return ServiceConfig(
        model_name=args.model,
        device=args.device,
        workers=args.workers,
        costly_workers=args.costly_workers,
        max_upload_bytes=int(args.max_upload_mb * MIB),
        max_pixels=int(args.max_megapixels * 1e6),
        caps=dict(args.cap or []),
        memory_budget=int(args.memory_budget_mb * MIB),
        time_limit=args.time_limit,
        allowed_origins=tuple(args.allow_origin or ()),
        refusal_delay=args.refusal_delay,
        refusal_allowance=args.refusal_allowance,
        costly_niceness=args.costly_niceness,
    )


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
        config = config_from_args(args)  # before the model loads
        loaded = model_from_args(args, torch.device(config.device or "cpu"))
        app = create_app(model=loaded, config=config)
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
        f"({args.workers} workers, {threads} torch threads, device {config.device or 'cpu'})",
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
    # uvicorn's exit handler, preceded by the service's shutdown (an instance attribute)
    setattr(  # noqa: B010
        server,
        "handle_exit",
        partial(_stop_work_first, app.state.service.shutdown, server.handle_exit),
    )
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
