"""The call path every method shares: ``method(inputs, target)`` → :class:`Explanation`.

:class:`MethodCall` (a base of :class:`evidencemap.methods.Method`) owns the call:
validation of the inputs (a floating tensor on the model's device, cast to the model's dtype),
the batch in chunks, eval mode (and BatchNorm statistics) restored afterwards, and the
packaging of a result (:meth:`MethodCall.finish`). A method supplies
:meth:`MethodCall.explain_batch` for one chunk.

**Chunks.** Without a memory budget the batch is split by ``batch_size`` only. Under one
(:func:`evidencemap.runtime.limits`, which the web service sets per request) a batch of more
than one input is split so that each chunk stays within the budget:

* before any work, what one input takes is estimated (:meth:`MethodCall.input_bytes`: for a
  method that backpropagates, what autograd saves for the backward pass of one input, counted
  on one forward pass by :func:`evidencemap.runtime.autograd_bytes` and cached per model by
  :func:`graph_bytes`; 0 for a method that keeps no graph); an input estimated over the budget
  is refused with :class:`~evidencemap.runtime.BudgetExceededError` before the method runs —
  at batch 1 too, where nothing else is checked (the estimate is a lower bound: a run may take
  more);
* the first input then runs alone, measured (:class:`evidencemap.memory.PeakMemory`), and the
  other chunks hold as many inputs as the larger of that peak and the estimate allows
  (:func:`evidencemap.runtime.run_chunked`), never more than ``batch_size``; a first input
  measured over the budget refuses the rest of the batch;
* between chunks :func:`evidencemap.runtime.checkpoint` reports ``done / total`` inputs
  (step ``"inputs"``) and stops a cancelled run.

Each chunk's explanation is computed as the whole batch's would be, so the joined result is the
unchunked one (to float rounding of batched kernels). Two kinds of calls are therefore not split
by the budget, only refused when the whole batch's estimate is over it: a method whose result
for one input depends on the rest of its batch (:attr:`MethodCall.batch_independent`: noise
drawn per batch, as FGVis' ``noise`` and the CAMs' ``gradient_noise``, or SmoothGrad over such
a method), and a target whose rows cannot be told apart (an arbitrary score function of the
whole output, :func:`evidencemap.targets.target_rows`). Methods that size their own loops'
chunks by the budget (:attr:`MethodCall.sizes_own_chunks`: Score-CAM, Integrated Gradients,
SmoothGrad) are split into single inputs when their batch is independent and left to their own
chunking otherwise; a method called inside another method's run (SmoothGrad's wrapped method)
takes its batch as given, the outer run having sized it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.capture import eval_mode
from evidencemap.checks import check_inputs
from evidencemap.explanation import Explanation
from evidencemap.maps import normalize
from evidencemap.targets import OutputKey, ResolvedTarget, Rows, Target, select_output, target_rows

__all__ = [
    "INPUTS_STEP",
    "Context",
    "MethodCall",
    "check_device",
    "concat",
    "explain_in_chunks",
    "graph_bytes",
    "one_run",
]

INPUTS_STEP = "inputs"
"""The progress step of a batch split into chunks: ``done`` of ``total`` inputs."""

_CACHE_ENTRIES = 32
"""Estimates kept per model (input shapes × layers × dtypes × devices); the oldest go first."""

# Per-input graph sizes, per model (weak keys: models are not kept alive).
_GRAPH_BYTES: WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = WeakKeyDictionary()
_GRAPH_LOCK = threading.Lock()
_running = threading.local()


@dataclass
class Context:
    """What a method may need beyond activations and gradients, for one batch.

    Attributes:
        model: the model (in eval mode while the method runs).
        inputs: ``(N, C, *S)`` inputs, detached.
        output: the model's output on ``inputs`` (the selected tensor), detached.
        target: the resolved target (score function and class indices).
        layer: the module whose activations are explained (layer methods only).
        forward: ``forward(x)`` → the selected output tensor of the model on ``x``.
    """

    model: nn.Module
    inputs: Tensor
    output: Tensor
    target: ResolvedTarget
    layer: nn.Module | None
    forward: Callable[[Tensor], Tensor]


class MethodCall:
    """The call of a method (a base of :class:`~evidencemap.methods.Method`, which sets the
    attributes below): ``method(inputs, target)`` → :class:`~evidencemap.Explanation`.

    A subclass supplies :meth:`explain_batch`; everything else here has a default.
    """

    name: ClassVar[str] = ""
    sizes_own_chunks: ClassVar[bool] = False
    """The method's own loops size their chunks by the memory budget (a ``memory_budget``
    option): under a budget its batch is split into single inputs when it may be, and not
    estimated by :meth:`input_bytes`."""
    model: nn.Module
    output_key: OutputKey
    eval_mode: bool
    batch_size: int | None

    def options(self) -> dict[str, Any]:
        """The options this method runs with (reported in :class:`Explanation`)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The model's selected output tensor on ``x``."""
        return select_output(self.model(x), self.output_key)

    def __call__(self, inputs: Tensor, target: Target = None) -> Explanation:
        """Explain ``inputs`` ``(N, C, *S)`` for ``target`` (see :func:`evidencemap.explain`).

        Inputs of another floating dtype than the model's parameters (float64 photos, say) are
        cast to the parameters' dtype first; the maps come back in that dtype. The batch is
        explained in chunks of at most ``batch_size`` inputs and, under a memory budget
        (:func:`evidencemap.runtime.limits`), of as many as the budget holds (see the module);
        the result is the same. :meth:`check_result` then looks at the joined result.

        Raises:
            ValueError: when the inputs are not on the model's device (:func:`check_device`).
            BudgetExceededError: under a budget, when one input is estimated (before any work)
                or measured over it.
        """
        x = check_inputs(inputs)
        dtype = check_device(self.model, x)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        explanation = explain_in_chunks(self, x, target)
        if not _inside_a_run():
            self.check_result(explanation)
        return explanation

    def check_result(self, explanation: Explanation) -> None:
        """Look at a call's joined result (default: nothing), e.g. warn about a flat map; not
        called for a method run inside another's (SmoothGrad's wrapped method)."""

    @property
    def batch_independent(self) -> bool:
        """Whether each input's explanation is independent of the rest of its batch, so that
        the batch may be split into chunks by a memory budget without changing any result
        (not so where noise is drawn per batch)."""
        return True

    def input_bytes(self, x: Tensor) -> int:
        """The memory a run takes for one input shaped like ``x[0]``, estimated before any work
        (under a memory budget only, with the model in the run's mode): for a method that
        backpropagates through the model, what autograd saves for the backward pass of one
        input (:func:`graph_bytes`: one forward pass of one input, cached per model); the input
        itself is not counted (as in :func:`evidencemap.runtime.autograd_bytes`). It is a lower
        bound of what the run takes (its temporaries come on top): an input estimated over the
        budget is refused before the run, and the first input of a split batch is measured as
        well."""
        return graph_bytes(self, x, ("input",), self.forward)

    def _run(self, x: Tensor, target: Target) -> Explanation:
        with eval_mode(self.model, self.eval_mode), torch.inference_mode(False), one_run():
            x = x.detach().clone()
            return self.explain_batch(x, target)

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        """Explain one batch (already validated, detached, model in eval mode)."""
        raise NotImplementedError

    def finish(
        self,
        raw: Tensor | list[Tensor],
        maps: Tensor,
        context: Context,
        scores: Tensor,
        layer: str | list[str] | None = None,
        extras: dict[str, Any] | None = None,
        normalise: bool = True,
    ) -> Explanation:
        """Package a result; ``maps`` at input resolution are min-max normalised here unless
        ``normalise=False`` (maps that already are in [0, 1] with a meaning of their own, e.g.
        FGVis' mask)."""
        return Explanation(
            maps=normalize(maps.detach()) if normalise else maps.detach(),
            raw=[r.detach() for r in raw] if isinstance(raw, list) else raw.detach(),
            targets=context.target.classes,
            scores=scores.detach(),
            method=self.name,
            layer=layer,
            options=self.options(),
            output=context.output,
            extras=extras or {},
        )


def check_device(model: nn.Module, x: Tensor) -> torch.dtype | None:
    """The floating dtype of ``model``'s parameters (``None``: it has none), after checking that
    ``x`` is on the device of those parameters (any device: CPU, CUDA, MPS …).

    A model spread over several devices (model parallelism) is not checked.

    Raises:
        ValueError: naming both devices, when every parameter is on one device and ``x`` on
            another.
    """
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    spread = False
    for p in model.parameters():
        if dtype is None and p.is_floating_point():
            dtype = p.dtype
        if device is None:
            device = p.device
        elif p.device != device:
            spread = True
    if device is not None and not spread and x.device != device:
        raise ValueError(
            f"inputs are on device {x.device} but the model's parameters are on {device}; "
            f"move one of them (inputs.to({str(device)!r}) or model.to({str(x.device)!r}))"
        )
    return dtype


@contextmanager
def one_run() -> Iterator[None]:
    """Mark the block as a method's run on this thread (methods called inside it are not
    split by the budget again)."""
    depth = getattr(_running, "depth", 0)
    _running.depth = depth + 1
    try:
        yield
    finally:
        _running.depth = depth


def _inside_a_run() -> bool:
    return getattr(_running, "depth", 0) > 0


def _structure(model: nn.Module) -> tuple[int, ...]:
    """The identities of the model's modules and parameters: a new one changes the key."""
    return (*map(id, model.modules()), *map(id, model.parameters()))


def graph_bytes(
    method: MethodCall, x: Tensor, what: tuple[Any, ...], forward: Callable[[Tensor], Any]
) -> int:
    """What autograd saves for the backward pass of ``forward`` on one input shaped like
    ``x[0]`` (:func:`evidencemap.runtime.autograd_bytes`; the model's parameters and buffers
    excluded): one extra forward pass of one input, made once per model and key.

    The key is ``what`` (which forward: ``("input",)`` the whole model, ``("layer", id)`` from a
    layer on), the input's shape without the batch axis, its dtype and device, and the
    identities of the model's modules and parameters: replacing a submodule or a parameter
    counts anew, while a change inside a module that alters what its forward saves (an
    attribute that switches its code path) is not seen — the first input of every split batch
    is measured anyway. A model with modules in training mode is not counted (0): a forward in
    training mode changes BatchNorm statistics and draws dropout masks.
    """
    model = method.model
    if any(m.training for m in model.modules()):
        return 0
    one = x[:1].detach()
    key = (what, tuple(one.shape[1:]), one.dtype, str(one.device), _structure(model))
    with _GRAPH_LOCK:
        known = _GRAPH_BYTES.get(model, {}).get(key)
    if known is not None:
        return known
    resident = [*model.parameters(), *model.buffers()]
    counted = runtime.autograd_bytes(forward, one, resident)
    with _GRAPH_LOCK:
        entries = _GRAPH_BYTES.setdefault(model, {})
        entries[key] = counted
        while len(entries) > _CACHE_ENTRIES:
            del entries[next(iter(entries))]
    return counted


def explain_in_chunks(method: MethodCall, x: Tensor, target: Target) -> Explanation:
    """``method``'s explanation of the validated batch ``x``, in chunks (see the module).

    Raises:
        BudgetExceededError: when one input (or a batch that cannot be split) is estimated
            or measured over the thread's memory budget.
        RunCancelledError: at a checkpoint between chunks, once the run is cancelled.
    """
    n = x.shape[0]
    size = n if method.batch_size is None else min(n, method.batch_size)
    rows = target_rows(target, n, x.ndim - 2)
    if runtime.current().memory_budget is None or _inside_a_run():
        return _in_chunks_of(method, x, target, rows, size)
    splits = method.batch_independent and rows is not None
    if method.sizes_own_chunks:
        return _in_chunks_of(method, x, target, rows, 1 if splits else size)
    with eval_mode(method.model, method.eval_mode), torch.inference_mode(False):
        per_input = method.input_bytes(x[:1])
    if not splits or rows is None or n == 1:
        if n == 1:
            why = "inputs"
        elif rows is None:
            why = f"batches of {size} inputs (the target's rows cannot be split)"
        else:
            why = f"batches of {size} inputs ({method.name} depends on the whole batch)"
        runtime.chunk_items(per_input * size, 1, why)
        return _in_chunks_of(method, x, target, rows, size)
    parts: list[Explanation] = []
    by_rows: Rows = rows

    def step(start: int, stop: int) -> None:
        runtime.checkpoint(start, n, INPUTS_STEP)
        parts.append(method._run(x[start:stop], by_rows(start, stop)))

    runtime.run_chunked(n, per_input, size, step, INPUTS_STEP)
    runtime.checkpoint(n, n, INPUTS_STEP)
    return concat(parts)


def _in_chunks_of(
    method: MethodCall, x: Tensor, target: Target, rows: Rows | None, size: int
) -> Explanation:
    """Chunks of ``size`` inputs (a target whose rows cannot be told apart goes to each)."""
    n = x.shape[0]
    if size >= n:
        return method._run(x, target)
    parts = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        runtime.checkpoint(start, n, INPUTS_STEP)
        parts.append(method._run(x[start:stop], target if rows is None else rows(start, stop)))
    runtime.checkpoint(n, n, INPUTS_STEP)
    return concat(parts)


def concat(parts: list[Explanation]) -> Explanation:
    """Join the explanations of consecutive chunks of a batch."""

    def cat(values: list[Any]) -> Any:
        first = values[0]
        if first is None:
            return None
        if isinstance(first, Tensor):
            return torch.cat(values) if first.ndim else first
        if isinstance(first, list):
            return [cat([v[i] for v in values]) for i in range(len(first))]
        if isinstance(first, dict):
            return {k: cat([v[k] for v in values]) for k in first}
        return first

    head = parts[0]
    return Explanation(
        maps=cat([p.maps for p in parts]),
        raw=cat([p.raw for p in parts]),
        targets=cat([p.targets for p in parts]),
        scores=cat([p.scores for p in parts]),
        method=head.method,
        layer=head.layer,
        options=head.options,
        output=cat([p.output for p in parts]),
        extras=cat([p.extras for p in parts]),
    )
