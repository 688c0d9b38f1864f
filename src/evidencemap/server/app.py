"""The web service: ``create_app()`` builds a FastAPI app that explains uploaded photos.

Endpoints (every error is ``{"error": message}`` with a 4xx status, never a stack trace):

* ``POST /api/explain`` — multipart upload ``file`` + form fields ``method`` (comma-separated
  names), ``target`` (class index) or ``top_k``, ``options`` (JSON object) →
  :class:`~evidencemap.server.schemas.ExplainResponse`.
* ``GET /api/methods``, ``GET /api/models``, ``GET /api/labels``, ``GET /health``, ``GET /`` (the
  page, with ``/page.js``, ``/page.css`` and ``/favicon.svg``), and FastAPI's ``/openapi.json``
  and ``/docs``.
* ``GET /api/progress/{request_id}`` and ``POST /api/cancel/{request_id}``: the progress of a
  request sent with that ``request_id`` form field, and stopping it
  (:mod:`evidencemap.server.progress`).

The model is any :class:`~evidencemap.models.LoadedModel` of an image model: a built-in name or a
user model (TorchScript or pickled file, ``package.module:factory``, …; see
:func:`evidencemap.models.load`). Concurrency: one model is loaded per app and shared. Explanations (decoding, forward, backward,
PNG encoding) run in a pool of ``workers`` threads, so the event loop stays free: ``/health`` and
a fast Grad-CAM answer while a Score-CAM runs. The library's hooks record only the calls of the
thread that registered them, and grad/inference mode are thread-local, so concurrent requests
never see each other's activations. The model must be in eval mode (it is, as loaded).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor, nn

import evidencemap
from evidencemap import models as builtin_models
from evidencemap import runtime, viz
from evidencemap.checks import check_positive_int
from evidencemap.explanation import Explanation
from evidencemap.io import ImageTooLargeError, UnsupportedImageError, load_image_bytes
from evidencemap.methods import build, describe, get_method, method_names
from evidencemap.methods.base import Method
from evidencemap.methods.registry import check_method_supports, check_options
from evidencemap.models.loading import LoadedModel
from evidencemap.server.costs import Calibration, CostBook
from evidencemap.server.middleware import FORM_SLACK, BodyLimit, Guard, RefusalThrottle
from evidencemap.server.progress import (
    METHODS_STEP,
    ProgressBoard,
    RequestProgress,
    check_request_id,
)
from evidencemap.server.schemas import (
    ArrayData,
    ErrorResponse,
    ExplainResponse,
    ExplanationResult,
    Health,
    ImageInfo,
    MethodCost,
    MethodInfo,
    ModelInfo,
    Prediction,
    ProgressInfo,
)
from evidencemap.targets import select_output

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MAX_TOP_K",
    "ApiError",
    "create_app",
    "is_costly",
    "method_options",
]

logger = logging.getLogger("evidencemap.server")

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""Largest accepted image file (10 MiB)."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image in pixels (40 MP), checked from the header before decoding."""
MAX_TOP_K = 10
"""Most classes one request may explain with ``top_k``."""
DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""Bytes one chunk of a method's computation may take per request (512 MiB)."""
DEFAULT_TIME_LIMIT = 120.0
"""Seconds one request may compute before it is stopped with a 422."""
DEFAULT_REFUSAL_DELAY = 0.5
"""Seconds a refusal waits once its client was refused too often (:class:`RefusalThrottle`)."""
DEFAULT_REFUSAL_ALLOWANCE = 20
"""Refusals per client address and 10 s answered without delay."""
COSTLY_PAUSE = 0.25
"""Seconds a costly request waits at most, at each of its checkpoints (an FGVis iteration, a
Score-CAM chunk …), while cheap requests compute: they get the cores first, and the costly
one still advances."""
DEFAULT_COSTLY_NICENESS = 19
"""How much the costly lane's threads are niced (Linux: each thread has its own scheduling
priority), so that the operating system gives the cores to cheap requests first and the costly
ones the time left over."""
TOP_PREDICTIONS = 5
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5
# Classes a target may name when the model has no labels (the output then bounds it).
_MAX_CLASSES = 2**31
# Option values accepted in the page's JSON: scalars and (nested) lists of them.
_SCALARS = (type(None), bool, int, float, str)


class ApiError(Exception):
    """A request the service refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- request parsing


def _parse_methods(text: str) -> list[type[Method]]:
    """Comma-separated method names → their classes (request order, duplicates dropped)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ApiError(400, "method must name at least one method, e.g. 'gradcam'")
    classes: list[type[Method]] = []
    for name in names:
        try:
            cls = get_method(name)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if cls not in classes:
            classes.append(cls)
    return classes


def _parse_int(text: str | None, name: str, low: int, high: int) -> int | None:
    """An optional form field holding an int in ``[low, high]``."""
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ApiError(
            400, f"{name} must be an integer from {low} to {high}, got {text!r}"
        ) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {value}")
    return value


def _parse_options(text: str | None, classes: list[type[Method]]) -> dict[str, dict[str, Any]]:
    """The ``options`` JSON → method name → keyword options.

    Either one object of options applied to every method (``{"top_k": 64}``), or an object
    keyed by method names whose values are objects (``{"scorecam": {"top_k": 64}}``).
    """
    if text is None or text.strip() == "":
        return {cls.name: {} for cls in classes}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"options must be a JSON object: {err}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"options must be a JSON object, got {type(parsed).__name__}")
    requested = {name: cls for cls in classes for name in (cls.name, *cls.aliases)}
    per_method = bool(parsed) and all(
        key.lower() in requested and isinstance(value, dict) for key, value in parsed.items()
    )
    if per_method:
        chosen = {requested[key.lower()].name: value for key, value in parsed.items()}
        return {cls.name: dict(chosen.get(cls.name, {})) for cls in classes}
    for key, value in parsed.items():
        if not _plain(value):
            raise ApiError(400, f"option {key!r} must be a number, string, boolean, null or list")
    return {cls.name: dict(parsed) for cls in classes}


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, _SCALARS)


def method_options(cls: type[Method]) -> dict[str, Any]:
    """The keyword options of method ``cls`` and their defaults (from its description)."""
    return {name: option.describe()["default"] for name, option in describe(cls).options.items()}


def _build(
    cls: type[Method], model: LoadedModel, options: dict[str, Any], caps: dict[str, float] | None
) -> Method:
    """Construct a method (:func:`evidencemap.methods.build`); a bad option name or value, a
    value over the service's caps, or a layer method on a TorchScript model is a 422 naming
    the method."""
    options = dict(options)
    layer = options.pop("layer", None)
    try:
        method = build(cls, model, layer, caps=caps, **options)
        check_method_supports(model, method)
        return method
    except (TypeError, ValueError) as err:
        raise _option_error(cls, err) from None


def _check_options(cls: type[Method], options: dict[str, Any], caps: dict[str, float]) -> None:
    """Refuse unknown, ill-typed or over-cap options of ``cls`` (a 422 naming the method) from
    their descriptions alone: no model, no image, so before the upload is decoded."""
    given = {k: v for k, v in options.items() if k != "layer"}
    try:
        check_options(describe(cls), given, caps)
    except (TypeError, ValueError) as err:
        raise _option_error(cls, err) from None


def _option_error(cls: type[Method], err: Exception) -> ApiError:
    text = str(err)
    return ApiError(422, text if text.startswith("method ") else f"method {cls.name!r}: {text}")


def is_costly(cls: type[Method]) -> bool:
    """Whether a method's time grows with an option (one of ``cost="work"``: iterations,
    samples, steps, channels) — FGVis, Score-CAM, Integrated Gradients, SmoothGrad; such
    requests run in the service's costly lane."""
    return any(option.cost == "work" for option in describe(cls).options.values())


# --------------------------------------------------------------------------- results


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's niceness by ``niceness`` (where the platform has per-thread
    priorities: Linux; elsewhere, or when refused, the thread keeps its priority)."""
    native_id = getattr(threading, "get_native_id", None)
    if niceness <= 0 or native_id is None or sys.platform != "linux":
        return
    try:
        tid = native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        )
    except OSError as err:  # e.g. a sandbox that forbids it: the lane still pauses for cheap work
        logger.warning("could not lower the costly lane's priority: %s", err)


def _array(values: Tensor) -> ArrayData:
    array = np.ascontiguousarray(values.detach().cpu().numpy(), dtype="<f4")
    return ArrayData(shape=list(array.shape), data=base64.b64encode(array.tobytes()).decode())


def _png_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(viz.to_png_bytes(image)).decode()


def _finite(value: float) -> float:
    """JSON has no NaN/inf: report them as 0 (never produced by the methods' maps)."""
    return value if math.isfinite(value) else 0.0


@dataclass
class _Service:
    """The shared state of one app: the model, its labels and the limits."""

    model: LoadedModel
    model_name: str
    max_upload_bytes: int
    max_pixels: int
    display_size: int
    caps: dict[str, float] = field(default_factory=dict)
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET
    time_limit: float | None = DEFAULT_TIME_LIMIT
    shutdown: threading.Event = field(default_factory=threading.Event)
    board: ProgressBoard = field(default_factory=ProgressBoard)
    costs: CostBook = field(default_factory=CostBook)
    cheap_running: int = 0
    cheap_done: threading.Condition = field(default_factory=threading.Condition)

    @contextmanager
    def _cheap(self) -> Iterator[None]:
        """Count a cheap request computing (costly ones yield to it at their checkpoints)."""
        with self.cheap_done:
            self.cheap_running += 1
        try:
            yield
        finally:
            with self.cheap_done:
                self.cheap_running -= 1
                self.cheap_done.notify_all()

    def _yield_to_cheap(self) -> None:
        """A costly request's checkpoint: wait while cheap requests compute, at most
        :data:`COSTLY_PAUSE` seconds."""
        with self.cheap_done:
            self.cheap_done.wait_for(
                lambda: self.cheap_running == 0 or self.shutdown.is_set(), timeout=COSTLY_PAUSE
            )

    def caps_for(self, cls: type[Method]) -> dict[str, float]:
        """The caps of ``cls``'s options: ``METHOD.OPTION`` entries, then ``OPTION`` entries,
        then each option's own default cap."""
        out: dict[str, float] = {}
        for name, option in describe(cls).options.items():
            cap = self.caps.get(f"{cls.name}.{name}", self.caps.get(name, option.cap))
            if option.cost and cap is not None:
                out[name] = cap
        return out

    def __post_init__(self) -> None:
        self.labels: list[str] = list(self.model.labels or [])
        if self.model.preprocess is None:
            raise ValueError(
                f"model {self.model.name!r} takes volumes; the service explains photos"
            )
        self.preprocess = self.model.preprocess
        grey = Image.new("RGB", (self.preprocess.size,) * 2, (128, 128, 128))
        self.calibration = Calibration(self.model, self.preprocess(grey).unsqueeze(0))

    def label(self, index: int) -> str:
        return self.model.label(index)

    def _display(self, image: Image.Image) -> tuple[Image.Image, list[float]]:
        """The model's centre crop of the photo at display resolution, and its box."""
        size = self.preprocess.size
        crop = list(self.preprocess.crop_box(image.width, image.height).region())
        side = int(min(self.display_size, max(size, round(crop[2] - crop[0]))))
        shown = image.resize((side, side), Image.Resampling.BICUBIC, box=tuple(crop))
        return shown, crop

    def _explanation_image(
        self, explanation: Explanation, row: int, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The explanation image of ``row`` (FGVis) and the model's score on it, if any."""
        shown = explanation.explanation_image(row)
        if shown is None or shown.image.ndim != 3:
            return {}
        pixels = self.preprocess.to_pixels(shown.image.detach().cpu()).clamp(0, 255)
        picture = Image.fromarray(pixels.round().to(torch.uint8).permute(1, 2, 0).numpy())
        return {
            "explanation_png": _png_url(picture.resize(size, Image.Resampling.BICUBIC)),
            "explanation_kind": shown.kind,
            "explanation_score": None if shown.score is None else _finite(shown.score),
            "explanation_top1": shown.top1,
        }

    def explain(
        self,
        data: bytes,
        classes: list[type[Method]],
        target: int | None,
        top_k: int | None,
        options: dict[str, dict[str, Any]],
        cancel: threading.Event | None = None,
    ) -> ExplainResponse:
        """Everything ``POST /api/explain`` computes; runs in a worker thread.

        The methods run under the service's memory budget and time limit
        (:mod:`evidencemap.runtime`); ``cancel`` (set when the client goes away) and the
        service's shutdown event stop them at their next checkpoint. A costly request
        (:func:`is_costly`) yields to the cheap ones computing at each checkpoint.
        """
        costly = any(is_costly(cls) for cls in classes)
        with (
            runtime.limits(
                memory_budget=self.memory_budget,
                timeout=self.time_limit,
                cancel=self.shutdown,
            ),
            runtime.limits(cancel=cancel, pause=self._yield_to_cheap if costly else None),
            nullcontext() if costly else self._cheap(),
        ):
            try:
                runtime.checkpoint()  # a request queued at shutdown answers 503 at once
                return self._explain(data, classes, target, top_k, options)
            except runtime.RunCancelledError as err:
                if cancel is not None and cancel.is_set():
                    raise ApiError(499, "the request was cancelled by the client") from None
                if self.shutdown.is_set():
                    raise ApiError(503, "the service is shutting down; retry later") from None
                raise ApiError(
                    422,
                    f"the request needs more than this service's time limit of "
                    f"{self.time_limit:g} s ({err}); ask for fewer iterations, samples or "
                    "classes",
                ) from None
            except runtime.BudgetExceededError as err:
                raise ApiError(413, str(err)) from None

    def _explain(
        self,
        data: bytes,
        classes: list[type[Method]],
        target: int | None,
        top_k: int | None,
        options: dict[str, dict[str, Any]],
    ) -> ExplainResponse:
        start = time.perf_counter()
        instances = [  # bad options are refused before the image is decoded
            _build(cls, self.model, options[cls.name], self.caps_for(cls)) for cls in classes
        ]
        try:
            image = load_image_bytes(data, max_pixels=self.max_pixels, name="the uploaded file")
        except UnsupportedImageError as err:
            raise ApiError(415, str(err)) from None
        except ImageTooLargeError as err:
            raise ApiError(413, str(err)) from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None

        x = self.preprocess(image).unsqueeze(0)
        with torch.inference_mode():
            probs = select_output(self.model(x)).float().softmax(1)[0]
        n_classes = int(probs.shape[0])
        top = probs.topk(min(max(TOP_PREDICTIONS, top_k or 1), n_classes))
        ranked = [int(i) for i in top.indices]
        if target is not None and target >= n_classes:
            raise ApiError(
                400, f"target must be an integer from 0 to {n_classes - 1}, got {target}"
            )
        chosen = [target] if target is not None else ranked[: top_k or 1]

        def prediction(index: int) -> Prediction:
            return Prediction.model_validate(
                {"class": index, "label": self.label(index), "probability": float(probs[index])}
            )

        shown, crop = self._display(image)
        batch = x.expand(len(chosen), *x.shape[1:])
        results: list[ExplanationResult] = []
        for done, instance in enumerate(instances):
            began = time.perf_counter()
            runtime.checkpoint(done, len(instances), METHODS_STEP)
            try:
                explanation = instance(batch, chosen)
            except runtime.BudgetExceededError:
                raise
            except ValueError as err:  # e.g. a layer option naming a non-spatial layer
                raise ApiError(422, f"method {instance.name!r}: {err}") from None
            seconds = time.perf_counter() - began
            self.costs.record(instance.name, seconds, len(chosen), explanation.options)
            raws = explanation.raw if isinstance(explanation.raw, list) else [explanation.raw]
            coloured = viz.for_display(explanation.maps, explanation.raw).detach().cpu()
            for i, index in enumerate(chosen):
                heat = coloured[i, 0]
                image_fields = self._explanation_image(explanation, i, shown.size)
                results.append(
                    ExplanationResult(
                        method=instance.name,
                        target=index,
                        label=self.label(index),
                        score=_finite(float(explanation.scores[i])),
                        layer=explanation.layer,
                        options={
                            k: v if isinstance(v, _SCALARS) else repr(v)
                            for k, v in explanation.options.items()
                        },
                        seconds=seconds,
                        overlay_png=_png_url(viz.overlay(shown, heat, COLORMAP, OVERLAY_ALPHA)),
                        heatmap_png=_png_url(viz.overlay(shown, heat, COLORMAP, 1.0)),
                        map=_array(explanation.maps[i, 0].detach().cpu()),
                        raw=[_array(r[i, 0]) for r in raws],
                        warning=explanation.warning(i),
                        **image_fields,
                    )
                )
        return ExplainResponse(
            model=self.model_name,
            image=ImageInfo(
                width=image.width,
                height=image.height,
                crop=crop,
                input_size=int(x.shape[-1]),
                display_size=shown.width,
            ),
            input_png=_png_url(shown),
            predictions=[prediction(i) for i in ranked[:TOP_PREDICTIONS]],
            targets=[prediction(i) for i in chosen],
            methods=[instance.name for instance in instances],
            colormap=COLORMAP,
            seconds=time.perf_counter() - start,
            explanations=results,
        )


# --------------------------------------------------------------------------- the app

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad request: missing/empty file, bad method, target, top_k or options.",
        403: "A cross-origin request (another site's page) was refused.",
        413: "The file or the image is too large, or the request needs more memory than the "
        "service's budget.",
        415: "The file is not a PNG, JPEG, TIFF, BMP or WebP image.",
        422: "A method option is unknown, has a bad value or is over the service's cap, or "
        "the request needs more than the service's time limit.",
        409: "The request_id is already used by a request in flight.",
        503: "Too many requests waiting, or the service is shutting down.",
    }.items()
}


def create_app(
    model_name: str | None = None,
    *,
    model: LoadedModel | nn.Module | None = None,
    workers: int = 2,
    costly_workers: int | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pending: int = 32,
    display_size: int = 448,
    caps: Mapping[str, float] | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    allowed_origins: Sequence[str] = (),
    refusal_delay: float = DEFAULT_REFUSAL_DELAY,
    refusal_allowance: int = DEFAULT_REFUSAL_ALLOWANCE,
    costly_niceness: int = DEFAULT_COSTLY_NICENESS,
) -> FastAPI:
    """Build the web service for one model.

    Args:
        model_name: a model spec (default ``efficientnet-lite0``), loaded once with :func:`evidencemap.models.load`: a built-in
            name (``evidencemap.models.builtin_names()``), a TorchScript or pickled model file,
            ``package.module:factory`` … (the default ImageNet preprocessing, no labels; load it
            yourself for others).
        model: an already loaded image model to serve instead: a
            :class:`~evidencemap.models.LoadedModel` (``evidencemap.models.load(spec, input_size=…,
            labels=…)``), or an ``nn.Module`` in eval mode (loaded with the defaults);
            ``model_name`` names it (default: its ``name``).
        workers: threads that compute cheap explanations concurrently (Grad-CAM & co).
        costly_workers: threads of the costly lane, which runs the requests naming a method
            whose time grows with an option (:func:`is_costly`: FGVis, Score-CAM, Integrated
            Gradients, SmoothGrad), so cheap requests never queue behind them; costly runs
            also pause at their checkpoints while cheap ones compute (:data:`COSTLY_PAUSE`)
            (default: ``max(1, workers // 2)``).
        max_upload_bytes: largest accepted file.
        max_pixels: largest accepted image (width × height), checked before decoding.
        max_pending: explanation requests computing or queued at once; more get 503.
        display_size: largest side of the returned PNGs (the model's crop of the photo).
        caps: the largest value of costly options: ``{"max_iterations": 200}`` for every
            method, ``{"fgvis.max_iterations": 200}`` for one; options not named keep their
            default caps (``GET /api/methods`` reports the caps in force).
        memory_budget: bytes one chunk of a method's computation may take (``None``: no limit).
        time_limit: seconds one request may compute (``None``: no limit).
        allowed_origins: other origins (``https://host:port``) whose pages may POST.
        refusal_delay: seconds each refusal (400, 403, 405, 413, 415, 422) waits once its client
            address was refused more than ``refusal_allowance`` times in the last 10 s
            (:class:`~evidencemap.server.middleware.RefusalThrottle`; ``0``: never). Valid
            requests are never held.
        refusal_allowance: refusals per address and 10 s answered at once.
        costly_niceness: niceness added to the costly lane's threads (0 to 19; Linux, where
            each thread has its own priority): with 19 the operating system runs them only on
            the time the cheap requests leave (``0``: the same priority).

    Returns:
        The FastAPI application (serve it with uvicorn).

    Raises:
        TypeError / ValueError: for a bad argument or model, or a model whose weights are not
            installed.
    """
    workers = check_positive_int(workers, "workers")
    costly_workers = check_positive_int(
        max(1, workers // 2) if costly_workers is None else costly_workers, "costly_workers"
    )
    max_upload_bytes = check_positive_int(max_upload_bytes, "max_upload_bytes")
    max_pixels = check_positive_int(max_pixels, "max_pixels")
    max_pending = check_positive_int(max_pending, "max_pending")
    display_size = check_positive_int(display_size, "display_size")
    if model is None:
        model = builtin_models.load(model_name or "efficientnet-lite0")
    elif isinstance(model, nn.Module):
        if model.training:
            raise ValueError("model must be in eval mode (call model.eval()) to be served")
        model = builtin_models.load(model)
    if not isinstance(model, LoadedModel):
        raise TypeError(
            f"model must be an evidencemap.models.LoadedModel or a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    model_name = model_name or model.name
    if model.module.training:
        raise ValueError("model must be in eval mode (call model.eval()) to be served")
    caps = dict(caps or {})
    for key, value in caps.items():
        name, _, option = key.rpartition(".")
        if name:
            get_method(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"caps[{key!r}] must be a number >= 0, got {value!r}")
        known = {o for m in method_names() for o in describe(m).options}
        if option not in known:
            raise ValueError(f"caps names an unknown option {option!r}")
    if memory_budget is not None:
        memory_budget = check_positive_int(memory_budget, "memory_budget")
    if (
        isinstance(refusal_delay, bool)
        or not isinstance(refusal_delay, (int, float))
        or not (0 <= refusal_delay <= 60)
    ):
        raise ValueError(f"refusal_delay must be seconds from 0 to 60, got {refusal_delay!r}")
    refusal_allowance = check_positive_int(refusal_allowance, "refusal_allowance")
    if isinstance(costly_niceness, bool) or not isinstance(costly_niceness, int):
        raise TypeError(f"costly_niceness must be an int, got {type(costly_niceness).__name__}")
    if not 0 <= costly_niceness <= 19:
        raise ValueError(f"costly_niceness must be from 0 to 19, got {costly_niceness}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    service = _Service(
        model,
        model_name,
        max_upload_bytes,
        max_pixels,
        display_size,
        caps=caps,
        memory_budget=memory_budget,
        time_limit=time_limit,
    )
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evidencemap-explain")
    costly_executor = ThreadPoolExecutor(
        max_workers=costly_workers,
        thread_name_prefix="evidencemap-costly",
        initializer=lower_thread_priority,
        initargs=(costly_niceness,),
    )
    pending = 0
    page = resources.files("evidencemap.server").joinpath("static/index.html").read_text("utf-8")
    assets = _page_assets()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.shutdown.set()  # running explanations stop at their next checkpoint
            executor.shutdown(wait=False, cancel_futures=True)
            costly_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="evidencemap",
        version=evidencemap.__version__,
        summary="Maps of evidence: why a convolutional network decided what it decided.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.executor = executor
    app.state.costly_executor = costly_executor
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_SLACK)
    app.add_middleware(Guard, allowed_origins=frozenset(o.rstrip("/") for o in allowed_origins))
    app.add_middleware(  # outermost: it sees the refusals of the two above as well
        RefusalThrottle, delay=refusal_delay, allowance=refusal_allowance
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=exc)
        return JSONResponse(
            {"error": f"internal server error ({type(exc).__name__}); see the server log"},
            status_code=500,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    for path, (body, kind) in assets.items():
        app.get(path, include_in_schema=False)(_asset(body, kind))

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Liveness: answers at once, also while explanations run."""
        return Health(
            status="ok",
            model=model_name,
            version=evidencemap.__version__,
            workers=workers,
            busy=pending,
        )

    @app.get("/api/methods", response_model=list[MethodInfo], tags=["explain"])
    async def list_methods() -> list[MethodInfo]:
        """Every method name (for ``method``), its aliases and its options with defaults."""
        try:
            calibration = await asyncio.to_thread(service.calibration.measure)
        except (RuntimeError, ValueError, TypeError) as err:  # estimates stay null
            logger.warning("could not time the passes of the model (no cost estimates): %s", err)
            calibration = None
        infos = []
        for name in method_names():
            spec = describe(name)
            caps_in_force = service.caps_for(spec.cls)
            infos.append(
                MethodInfo(
                    name=spec.name,
                    aliases=list(spec.aliases),
                    uses_layer=spec.uses_layer,
                    summary=spec.summary,
                    options={n: o.describe()["default"] for n, o in spec.options.items()},
                    option_specs=[
                        {**o.describe(), "cap": caps_in_force.get(n)}
                        for n, o in spec.options.items()
                    ],
                    cost=MethodCost(**service.costs.cost(spec.name, calibration)),
                )
            )
        return infos

    @app.get("/api/models", response_model=list[ModelInfo], tags=["explain"])
    async def list_models() -> list[ModelInfo]:
        """The built-in models, whether installed, and which one this server explains."""
        installed = set(builtin_models.available())
        names = list(dict.fromkeys([*builtin_models.builtin_names(), model_name]))
        return [
            ModelInfo(name=n, installed=n in installed or n == model_name, served=n == model_name)
            for n in names
        ]

    @app.get("/api/labels", response_model=list[str], tags=["explain"])
    async def list_labels() -> list[str]:
        """The served model's class names, index-aligned with ``target`` (empty when the
        model has none: targets are then class indices)."""
        return service.labels

    @app.post("/api/explain", response_model=ExplainResponse, responses=_ERRORS, tags=["explain"])
    async def explain(
        request: Request,
        file: Annotated[
            UploadFile | None, File(description="The photo (PNG, JPEG, TIFF, BMP, WebP).")
        ] = None,
        method: Annotated[str, Form(description="Method name(s), comma-separated.")] = "gradcam",
        target: Annotated[
            str | None, Form(description="Class index to explain (default: top-1).")
        ] = None,
        top_k: Annotated[
            str | None, Form(description=f"Explain the top-k classes (1–{MAX_TOP_K}).")
        ] = None,
        options: Annotated[
            str | None,
            Form(
                description='Method options as a JSON object, e.g. {"top_k": 64}, or per '
                'method, e.g. {"scorecam": {"top_k": 64}}.'
            ),
        ] = None,
        request_id: Annotated[
            str | None,
            Form(
                description="An id of your choice (8–64 letters, digits, - or _) to follow the "
                "request at GET /api/progress/{request_id} and stop it with POST "
                "/api/cancel/{request_id}."
            ),
        ] = None,
    ) -> ExplainResponse:
        """Explain the model's decision on an uploaded photo with one or more methods."""
        nonlocal pending
        if file is None:
            raise ApiError(400, "no image: send the photo as the multipart field 'file'")
        sent = (await request.form()).get("method")
        if isinstance(sent, str) and not sent.strip():  # an empty field, not a missing one
            raise ApiError(400, "method must name at least one method, e.g. 'gradcam'")
        classes = _parse_methods(method)
        n_labels = len(service.labels) or _MAX_CLASSES  # without labels: checked on the output
        chosen = _parse_int(target, "target", 0, n_labels - 1)
        k = _parse_int(top_k, "top_k", 1, MAX_TOP_K)
        if chosen is not None and k is not None:
            raise ApiError(400, "give either target or top_k, not both")
        parsed = _parse_options(options, classes)
        if request_id is not None:
            try:
                request_id = check_request_id(request_id)
            except ValueError as err:
                raise ApiError(400, str(err)) from None
        for cls in classes:  # refused here, without a worker, before the image is decoded
            _check_options(cls, parsed[cls.name], service.caps_for(cls))
        data = await file.read(max_upload_bytes + 1)
        if len(data) == 0:
            raise ApiError(400, "the uploaded file is empty")
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the uploaded file exceeds the limit of {max_upload_bytes} bytes")
        if pending >= max_pending:
            raise ApiError(503, f"server busy: {pending} explanations in progress; retry later")
        cancel = threading.Event()
        progress = _register(service.board, request_id, classes, cancel)
        pending += 1
        try:
            job = partial(service.explain, data, classes, chosen, k, parsed, cancel)
            if progress is not None:
                job = partial(progress.run, job)
            lane = costly_executor if any(is_costly(c) for c in classes) else executor
            future = asyncio.get_running_loop().run_in_executor(lane, job)
            while True:  # a client that goes away cancels its work
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    cancel.set()
        finally:
            pending -= 1
            service.board.release(progress)

    @app.get(
        "/api/progress/{request_id}",
        response_model=ProgressInfo,
        responses={400: _ERRORS[400]},
        tags=["explain"],
    )
    async def request_progress(request_id: str) -> ProgressInfo:
        """The state of the explanation request sent with this ``request_id``: queued,
        running (which method, which step), done, failed or cancelled; ``"unknown"`` before
        it arrives and a while after it finished."""
        return ProgressInfo(**service.board.get(_request_id(request_id)))

    @app.post(
        "/api/cancel/{request_id}",
        response_model=ProgressInfo,
        responses={400: _ERRORS[400], 403: _ERRORS[403]},
        tags=["explain"],
    )
    async def cancel_request(request_id: str) -> ProgressInfo:
        """Stop the explanation request sent with this ``request_id`` at its method's next
        step (the request itself is then answered 499); an id that has not arrived yet is
        cancelled when it does."""
        return ProgressInfo(**service.board.cancel(_request_id(request_id)))

    return app


def _request_id(value: str) -> str:
    try:
        return check_request_id(value)
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def _register(
    board: ProgressBoard,
    request_id: str | None,
    classes: list[type[Method]],
    cancel: threading.Event,
) -> RequestProgress | None:
    """Track the request on ``board`` when it has an id (409 when that id is in flight)."""
    if request_id is None:
        return None
    try:
        return board.register(request_id, [cls.name for cls in classes], cancel)
    except KeyError:
        raise ApiError(409, f"request_id {request_id!r} is already in use") from None


_ASSETS = {
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}


def _asset(body: bytes, kind: str) -> Callable[[], Awaitable[Response]]:
    """The handler of one of the page's files."""

    async def asset() -> Response:
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    return asset


def _page_assets() -> dict[str, tuple[bytes, str]]:
    """The page's script, style sheet and icon: URL path → (bytes, media type)."""
    static = resources.files("evidencemap.server").joinpath("static")
    return {
        path: (static.joinpath(name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()
    }
