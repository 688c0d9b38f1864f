"""The settings of one service, in one frozen object checked once: :class:`ServiceConfig`.

Each setting is described once, as an :class:`~evidencemap.methods.options.Option` in
:data:`SETTINGS` (kind, default, range, meaning); :class:`ServiceConfig` checks every value
with it when it is built, and ``evidencemap serve`` reads its flags with
:func:`parse_setting`, which runs the same check on the text, so that a bad flag is refused
before the model loads and no check is written twice. Nothing here imports FastAPI.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from evidencemap.methods import describe, get_method, method_names
from evidencemap.methods.options import Option

__all__ = [
    "COSTLY_PAUSE",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MODEL",
    "DEFAULT_TIME_LIMIT",
    "MAX_TOP_K",
    "SETTINGS",
    "ServiceConfig",
    "check_cap",
    "check_device",
    "parse_setting",
]

DEFAULT_MODEL = "efficientnet-lite0"
"""The model served when none is named."""
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""Largest accepted image file (10 MiB)."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image in pixels (40 MP), checked from the header before decoding."""
DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""Bytes one chunk of a method's computation may take per request (512 MiB)."""
DEFAULT_TIME_LIMIT = 120.0
"""Seconds one request may compute before it is stopped with a 422."""
MAX_TOP_K = 10
"""Most classes one request may explain with ``top_k``."""
COSTLY_PAUSE = 0.25
"""Seconds a costly request waits at most, at each of its checkpoints (an FGVis iteration, a
Score-CAM chunk …), while cheap requests compute: they get the cores first, and the costly
one still advances."""

SETTINGS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("workers", "int", 2, "threads computing cheap explanations (Grad-CAM & co)", low=1),
        Option(
            "costly_workers",
            "int",
            None,
            "threads of the costly lane (None: workers // 2, at least 1)",
            low=1,
            nullable=True,
        ),
        Option("max_upload_bytes", "int", DEFAULT_MAX_UPLOAD_BYTES, "largest file", low=1),
        Option("max_pixels", "int", DEFAULT_MAX_PIXELS, "largest image (width × height)", low=1),
        Option("max_pending", "int", 32, "requests computing or queued at once", low=1),
        Option("display_size", "int", 448, "largest side of the returned PNGs", low=1),
        Option(
            "memory_budget",
            "int",
            DEFAULT_MEMORY_BUDGET,
            "bytes one chunk of a method's computation may take (None: no limit)",
            low=1,
            nullable=True,
        ),
        Option(
            "time_limit",
            "float",
            DEFAULT_TIME_LIMIT,
            "seconds one request may compute (None: no limit)",
            low=0,
            low_open=True,
            nullable=True,
        ),
        Option(
            "refusal_delay",
            "float",
            0.5,
            "seconds a refusal waits once its client was refused too often",
            low=0,
            high=60,
        ),
        Option("refusal_allowance", "int", 20, "refusals per address and 10 s", low=1),
        Option(
            "costly_niceness", "int", 19, "niceness of the costly lane's threads", low=0, high=19
        ),
    )
}
"""Every numeric setting of :class:`ServiceConfig`, described once."""

_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def check_device(value: str | torch.device | None) -> str | None:
    """A device name the service can run on: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ValueError: for another form, or a device this machine does not have (naming what
            it has).
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {str(value)!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {text}: CUDA is not available here (torch {torch.__version__}, built "
                f"for CUDA {torch.version.cuda or 'none'}); use cpu"
            )
        count = torch.cuda.device_count()
        if int(text.partition(":")[2] or 0) >= count:
            raise ValueError(f"device {text}: this machine has {count} CUDA device(s)")
    if text == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps: Apple's Metal (MPS) is not available here; use cpu")
    return text


def check_cap(key: str, value: Any) -> float:
    """One entry of :attr:`ServiceConfig.caps`: ``[METHOD.]OPTION`` → a number ≥ 0.

    Raises:
        ValueError: for an unknown method or option, or a value that is not a number ≥ 0.
    """
    name, _, option = key.rpartition(".")
    if name:
        get_method(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"caps[{key!r}] must be a number >= 0, got {value!r}")
    if option not in {o for m in method_names() for o in describe(m).options}:
        raise ValueError(f"caps names an unknown option {option!r}")
    return float(value)


def parse_setting(name: str, text: str, unit: float = 1.0) -> Any:
    """The value of setting ``name`` written as ``text`` (a command-line flag), checked.

    ``unit`` scales a number given in another unit (MiB: ``2**20``); the value returned is
    the number as written, checked once scaled.

    Raises:
        ValueError: ``"expected …, got …"``.
    """
    if name == "device":
        return check_device(text)
    option = SETTINGS[name]
    what = option.expected() if unit == 1.0 else "a number > 0"
    try:
        number = float(text) if unit != 1.0 or option.kind == "float" else int(text)
        scaled = number * unit
        option.check(int(scaled) if option.kind == "int" else scaled)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected {what}, got {text!r}") from None
    return number


@dataclass(frozen=True)
class ServiceConfig:
    """Everything one service is set up with (the model object aside), checked once.

    Attributes:
        model_name: the model spec to load, or the name shown for a model given as an object
            (``None``: its own name, or :data:`DEFAULT_MODEL`).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (:func:`check_device`); ``None``: the
            given model's own device (``cpu`` for a model loaded by name).
        workers … costly_niceness: see :data:`SETTINGS` (``costly_workers`` ``None``:
            ``max(1, workers // 2)``, :attr:`costly_threads`).
        caps: the largest value of costly options: ``{"max_iterations": 200}`` for every
            method, ``{"fgvis.max_iterations": 200}`` for one (:func:`check_cap`).
        allowed_origins: other origins (``https://host:port``) whose pages may POST.

    Raises:
        TypeError / ValueError: naming the first bad setting.
    """

    model_name: str | None = None
    device: str | None = None
    workers: int = 2
    costly_workers: int | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_pending: int = 32
    display_size: int = 448
    caps: Mapping[str, float] = field(default_factory=dict)
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET
    time_limit: float | None = DEFAULT_TIME_LIMIT
    allowed_origins: tuple[str, ...] = ()
    refusal_delay: float = 0.5
    refusal_allowance: int = 20
    costly_niceness: int = 19

    def __post_init__(self) -> None:
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise TypeError(f"model_name must be a string, got {type(self.model_name).__name__}")
        checked: dict[str, Any] = {
            name: option.check(getattr(self, name)) for name, option in SETTINGS.items()
        }
        checked["device"] = check_device(self.device)
        caps = dict(self.caps or {})
        checked["caps"] = MappingProxyType({k: check_cap(k, v) for k, v in caps.items()})
        origins = self.allowed_origins
        if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
            raise TypeError("allowed_origins must be a sequence of strings")
        checked["allowed_origins"] = tuple(o.rstrip("/") for o in origins)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def costly_threads(self) -> int:
        """Threads of the costly lane: ``costly_workers``, else ``max(1, workers // 2)``."""
        return self.costly_workers or max(1, self.workers // 2)

    def replace(self, **settings: Any) -> ServiceConfig:
        """A copy with ``settings`` changed (checked again).

        Raises:
            TypeError: for a name that is no setting (listing them).
        """
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(
                f"unknown service setting(s) {', '.join(unknown)}; settings: {', '.join(names)}"
            )
        return dataclasses.replace(self, **settings)
