"""The service itself, without HTTP: the model, the two lanes, the limits and the explain flow.

A :class:`Service` holds one model (shared by every request), its labels and preprocessing,
the cost calibration, the progress board and two thread pools: the cheap lane (Grad-CAM & co)
and the costly lane (:func:`is_costly`: FGVis, Score-CAM, Integrated Gradients, SmoothGrad),
whose threads are niced and pause at their checkpoints while cheap requests compute. The routes
(:mod:`evidencemap.server.routes`) read a request (:mod:`evidencemap.server.forms`), let the
service check it (:meth:`Service.prepare`: options and caps, whether each method applies to the
model — before the upload is decoded, without a worker) and run it in a lane
(:meth:`Service.submit` → :meth:`Service.explain`). Refusals are
:class:`~evidencemap.server.errors.ApiError`; nothing here imports FastAPI.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import Tensor, nn

from evidencemap import models as builtin_models
from evidencemap import runtime
from evidencemap.io import ImageTooLargeError, UnsupportedImageError, load_image_bytes
from evidencemap.methods import describe
from evidencemap.methods.base import Method
from evidencemap.methods.options import rename_deprecated
from evidencemap.methods.registry import (
    MethodSpec,
    check_method_supports,
    check_options,
    unsupported_reason,
)
from evidencemap.models.loading import LoadedModel
from evidencemap.server import render
from evidencemap.server.config import COSTLY_PAUSE, DEFAULT_MODEL, ServiceConfig
from evidencemap.server.costs import Calibration, CostBook
from evidencemap.server.errors import ApiError
from evidencemap.server.forms import ExplainRequest
from evidencemap.server.progress import METHODS_STEP, ProgressBoard
from evidencemap.server.schemas import ExplainResponse, ImageInfo, Prediction
from evidencemap.targets import select_output

__all__ = [
    "TOP_PREDICTIONS",
    "MethodCall",
    "Prepared",
    "Service",
    "is_costly",
    "load_served_model",
    "lower_thread_priority",
    "method_options",
]

logger = logging.getLogger("evidencemap.server")
T = TypeVar("T")

TOP_PREDICTIONS = 5
"""Classes of the model's output listed in every answer."""


def is_costly(method: str | type[Method] | MethodSpec) -> bool:
    """Whether a method's time grows with an option (one of ``cost="work"``: iterations,
    samples, steps, channels) — FGVis, Score-CAM, Integrated Gradients, SmoothGrad; such
    requests run in the service's costly lane."""
    spec = method if isinstance(method, MethodSpec) else describe(method)
    return any(option.cost == "work" for option in spec.options.values())


def method_options(cls: str | type[Method]) -> dict[str, Any]:
    """The keyword options of method ``cls`` and their defaults (from its description)."""
    return {name: option.describe()["default"] for name, option in describe(cls).options.items()}


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


def load_served_model(config: ServiceConfig, model: LoadedModel | nn.Module | None) -> LoadedModel:
    """The model to serve: ``model`` (a :class:`LoadedModel` or an ``nn.Module`` in eval
    mode), else ``config.model_name`` loaded; moved to ``config.device`` when one is set.

    Raises:
        TypeError / ValueError: for another kind of object, a model in training mode, a model
            that cannot be loaded or one that takes volumes.
    """
    if model is None:
        model = builtin_models.load(config.model_name or DEFAULT_MODEL, config.device or "cpu")
    elif isinstance(model, nn.Module):
        if model.training:
            raise ValueError("model must be in eval mode (call model.eval()) to be served")
        model = builtin_models.load(model)
    if not isinstance(model, LoadedModel):
        raise TypeError(
            f"model must be an evidencemap.models.LoadedModel or a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    if model.module.training:
        raise ValueError("model must be in eval mode (call model.eval()) to be served")
    if model.preprocess is None:
        raise ValueError(f"model {model.name!r} takes volumes; the service explains photos")
    if config.device is not None:
        model.to(config.device)
    return model


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@dataclass(frozen=True)
class MethodCall:
    """One method of a request, its options checked (:meth:`Service.prepare`)."""

    spec: MethodSpec
    layer: Any
    options: dict[str, Any]

    def build(self, model: LoadedModel) -> Method:
        """The method on ``model`` (its options were checked: they are not checked again)."""
        if self.spec.uses_layer:
            return self.spec.cls(model.module, self.layer, **self.options)  # type: ignore[call-arg]
        return self.spec.cls(model.module, **self.options)


@dataclass(frozen=True)
class Prepared:
    """A request the service accepted: its methods, classes and lane."""

    calls: tuple[MethodCall, ...]
    target: int | None
    top_k: int | None
    costly: bool


class Service:
    """One served model and everything shared by its requests.

    Attributes:
        config: the settings. model: the served model. labels: its class names (may be empty).
        board: progress and cancel by request id. costs: the measured cost of each method.
        shutdown: set when the service stops (running requests end at their next checkpoint).
        pending: requests computing or queued now.
    """

    def __init__(self, config: ServiceConfig, model: LoadedModel) -> None:
        if model.preprocess is None:
            raise ValueError(f"model {model.name!r} takes volumes; the service explains photos")
        self.config = config
        self.model = model
        self.model_name = config.model_name or model.name
        self.labels: list[str] = list(model.labels or [])
        self.preprocess = model.preprocess
        self.device = _device_of(model.module)
        grey = Image.new("RGB", (self.preprocess.size,) * 2, (128, 128, 128))
        self.calibration = Calibration(model.module, self._input(grey))
        self.board = ProgressBoard()
        self.costs = CostBook()
        self.shutdown = threading.Event()
        self.pending = 0
        self._reasons: dict[type[Method], str | None] = {}
        self._cheap_running = 0
        self._cheap_done = threading.Condition()
        self.cheap_lane = ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix="evidencemap-explain"
        )
        self.costly_lane = ThreadPoolExecutor(
            max_workers=config.costly_threads,
            thread_name_prefix="evidencemap-costly",
            initializer=lower_thread_priority,
            initargs=(config.costly_niceness,),
        )

    def close(self) -> None:
        """Stop: running explanations end at their next checkpoint, queued ones are dropped."""
        self.shutdown.set()
        self.cheap_lane.shutdown(wait=False, cancel_futures=True)
        self.costly_lane.shutdown(wait=False, cancel_futures=True)

    def label(self, index: int) -> str:
        """The name of class ``index``."""
        return self.model.label(index)

    def _input(self, image: Image.Image) -> Tensor:
        return self.preprocess(image).unsqueeze(0).to(self.device)

    # ------------------------------------------------------------------ checks (event loop)

    def caps_for(self, spec: MethodSpec) -> dict[str, float]:
        """The caps of a method's options: ``METHOD.OPTION`` entries, then ``OPTION`` entries,
        then each option's own default cap."""
        caps = self.config.caps
        out: dict[str, float] = {}
        for name, option in spec.options.items():
            cap = caps.get(f"{spec.name}.{name}", caps.get(name, option.cap))
            if option.cost and cap is not None:
                out[name] = cap
        return out

    def unsupported(self, spec: MethodSpec) -> str | None:
        """Why the method cannot explain the served model, or ``None`` (a static check)."""
        if spec.cls not in self._reasons:
            self._reasons[spec.cls] = unsupported_reason(spec.cls, self.model)
        return self._reasons[spec.cls]

    def prepare(self, request: ExplainRequest) -> Prepared:
        """Check each method's options (once: names, values, caps) and that it applies to the
        model, before the upload is decoded; a refusal is a 422 naming the method."""
        calls = []
        for spec in request.methods:
            options = dict(request.options.get(spec.name, {}))
            layer = options.pop("layer", None)
            try:
                if layer is not None and not spec.uses_layer:
                    raise ValueError("it works in input space and takes no layer")
                options = rename_deprecated(options, spec.options, f"method {spec.name!r}")
                check_options(spec, options, self.caps_for(spec))
                if not spec.forwards_to and self.unsupported(spec) is not None:
                    check_method_supports(self.model, spec.cls)  # the reason, and what applies
            except (TypeError, ValueError) as err:
                raise _option_error(spec.name, err) from None
            calls.append(MethodCall(spec, layer, options))
        costly = any(is_costly(call.spec) for call in calls)
        return Prepared(tuple(calls), request.target, request.top_k, costly)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request as pending for its whole life; 503 when too many are.

        Called on the event loop only (the count is not shared between threads)."""
        if self.pending >= self.config.max_pending:
            raise ApiError(
                503, f"server busy: {self.pending} explanations in progress; retry later"
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def submit(self, job: Callable[[], T], costly: bool) -> Future[T]:
        """Run ``job`` in the costly or the cheap lane."""
        return (self.costly_lane if costly else self.cheap_lane).submit(job)

    # ------------------------------------------------------------------ the work (worker thread)

    @contextmanager
    def _cheap(self) -> Iterator[None]:
        """Count a cheap request computing (costly ones yield to it at their checkpoints)."""
        with self._cheap_done:
            self._cheap_running += 1
        try:
            yield
        finally:
            with self._cheap_done:
                self._cheap_running -= 1
                self._cheap_done.notify_all()

    def _yield_to_cheap(self) -> None:
        """A costly request's checkpoint: wait while cheap requests compute, at most
        :data:`~evidencemap.server.config.COSTLY_PAUSE` seconds."""
        with self._cheap_done:
            self._cheap_done.wait_for(
                lambda: self._cheap_running == 0 or self.shutdown.is_set(), timeout=COSTLY_PAUSE
            )

    def explain(
        self, data: bytes, prepared: Prepared, cancel: threading.Event | None = None
    ) -> ExplainResponse:
        """Everything ``POST /api/explain`` computes; runs in a worker thread.

        The methods run under the service's memory budget and time limit
        (:mod:`evidencemap.runtime`); ``cancel`` (set when the client goes away or cancels)
        and the service's shutdown event stop them at their next checkpoint. A costly request
        yields to the cheap ones computing at each checkpoint.
        """
        config = self.config
        costly = prepared.costly
        with (
            runtime.limits(
                memory_budget=config.memory_budget, timeout=config.time_limit, cancel=self.shutdown
            ),
            runtime.limits(cancel=cancel, pause=self._yield_to_cheap if costly else None),
            nullcontext() if costly else self._cheap(),
        ):
            try:
                runtime.checkpoint()  # a request queued at shutdown answers 503 at once
                return self._explain(data, prepared)
            except runtime.RunCancelledError as err:
                if cancel is not None and cancel.is_set():
                    raise ApiError(499, "the request was cancelled by the client") from None
                if self.shutdown.is_set():
                    raise ApiError(503, "the service is shutting down; retry later") from None
                raise ApiError(
                    422,
                    f"the request needs more than this service's time limit of "
                    f"{config.time_limit:g} s ({err}); ask for fewer iterations, samples or "
                    "classes",
                ) from None
            except runtime.BudgetExceededError as err:
                raise ApiError(413, str(err)) from None

    def _build(self, call: MethodCall) -> Method:
        try:
            method = call.build(self.model)
            check_method_supports(self.model, method)  # what an instance wraps decides
            return method
        except (TypeError, ValueError) as err:
            raise _option_error(call.spec.name, err) from None

    def _decode(self, data: bytes) -> Image.Image:
        try:
            return load_image_bytes(
                data, max_pixels=self.config.max_pixels, name="the uploaded file"
            )
        except UnsupportedImageError as err:
            raise ApiError(415, str(err)) from None
        except ImageTooLargeError as err:
            raise ApiError(413, str(err)) from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None

    def _prediction(self, probs: Tensor, index: int) -> Prediction:
        return Prediction.model_validate(
            {"class": index, "label": self.label(index), "probability": float(probs[index])}
        )

    def _explain(self, data: bytes, prepared: Prepared) -> ExplainResponse:
        start = time.perf_counter()
        instances = [self._build(call) for call in prepared.calls]  # before decoding
        image = self._decode(data)
        x = self._input(image)
        with torch.inference_mode():
            probs = select_output(self.model(x)).float().softmax(1)[0].cpu()
        n_classes = int(probs.shape[0])
        top = probs.topk(min(max(TOP_PREDICTIONS, prepared.top_k or 1), n_classes))
        ranked = [int(i) for i in top.indices]
        target = prepared.target
        if target is not None and target >= n_classes:
            raise ApiError(
                400, f"target must be an integer from 0 to {n_classes - 1}, got {target}"
            )
        chosen = [target] if target is not None else ranked[: prepared.top_k or 1]
        shown, crop = render.display(image, self.preprocess, self.config.display_size)
        batch = x.expand(len(chosen), *x.shape[1:])
        results = []
        for done, (call, instance) in enumerate(zip(prepared.calls, instances, strict=True)):
            runtime.checkpoint(done, len(instances), METHODS_STEP)
            began = time.perf_counter()
            try:
                explanation = instance(batch, chosen)
            except runtime.BudgetExceededError:
                raise
            except ValueError as err:  # e.g. a layer option naming a non-spatial layer
                raise ApiError(422, f"method {instance.name!r}: {err}") from None
            seconds = time.perf_counter() - began
            self.costs.record(call.spec, seconds, len(chosen), explanation.options)
            results += render.method_results(
                instance.name, explanation, chosen, seconds, shown, self.preprocess, self.label
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
            input_png=render.png_url(shown),
            predictions=[self._prediction(probs, i) for i in ranked[:TOP_PREDICTIONS]],
            targets=[self._prediction(probs, i) for i in chosen],
            methods=[instance.name for instance in instances],
            colormap=render.COLORMAP,
            seconds=time.perf_counter() - start,
            explanations=results,
        )


def _option_error(name: str, err: Exception) -> ApiError:
    text = str(err)
    return ApiError(422, text if text.startswith("method ") else f"method {name!r}: {text}")
