"""A method's batch in chunks: by its ``batch_size`` option and by the run's memory budget.

Every method's call (:meth:`evidencemap.methods.Method.__call__`) goes through
:func:`explain_in_chunks`. Without a memory budget the batch is split by ``batch_size`` only.
Under one (:func:`evidencemap.runtime.limits`, which the web service sets per request) a batch
of more than one input is split so that each chunk stays within the budget:

* before any work, what one input takes is estimated (:meth:`Method.input_bytes`: for a method
  that backpropagates, what autograd saves for the backward pass of one input, counted on one
  forward pass by :func:`evidencemap.runtime.autograd_bytes` and cached per model by
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
for one input depends on the rest of its batch (:attr:`Method.batch_independent`: noise drawn
per batch, as FGVis' ``noise`` and the CAMs' ``gradient_noise``, or SmoothGrad over such a
method), and a target whose rows cannot be told apart
(an arbitrary score function of the whole output, :func:`evidencemap.targets.target_rows`).
Methods that size their own loops' chunks by the budget (those with a ``memory_budget`` option:
Score-CAM, Integrated Gradients, SmoothGrad) are split into single inputs when their batch is
independent and left to their own chunking otherwise; a method called inside another method's
run (SmoothGrad's wrapped method) takes its batch as given, the outer run having sized it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.capture import eval_mode
from evidencemap.explanation import Explanation
from evidencemap.methods.options import options_of
from evidencemap.targets import Rows, Target, target_rows

if TYPE_CHECKING:
    from evidencemap.methods.base import Method

__all__ = ["INPUTS_STEP", "concat", "explain_in_chunks", "graph_bytes", "one_run"]

INPUTS_STEP = "inputs"
"""The progress step of a batch split into chunks: ``done`` of ``total`` inputs."""

_CACHE_ENTRIES = 32
"""Estimates kept per model (input shapes × layers × dtypes × devices); the oldest go first."""

# Per-input graph sizes, per model (weak keys: models are not kept alive).
_GRAPH_BYTES: WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = WeakKeyDictionary()
_GRAPH_LOCK = threading.Lock()
_running = threading.local()


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
    method: Method, x: Tensor, what: tuple[Any, ...], forward: Callable[[Tensor], Any]
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


def _sizes_own_chunks(method: Method) -> bool:
    """Whether the method's loops size their chunks by the budget (a ``memory_budget`` option)."""
    return "memory_budget" in options_of(type(method))


def explain_in_chunks(method: Method, x: Tensor, target: Target) -> Explanation:
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
    if _sizes_own_chunks(method):
        return _in_chunks_of(method, x, target, rows, 1 if splits else size)
    with eval_mode(method.model, method.eval_mode), torch.inference_mode(False):
        per_input = method.input_bytes(x[:1])
    if not splits or n == 1:
        if n == 1:
            why = "inputs"
        elif rows is None:
            why = f"batches of {size} inputs (the target's rows cannot be split)"
        else:
            why = f"batches of {size} inputs ({method.name} depends on the whole batch)"
        runtime.chunk_items(per_input * size, 1, why)
        return _in_chunks_of(method, x, target, rows, size)
    parts: list[Explanation] = []

    def step(start: int, stop: int) -> None:
        runtime.checkpoint(start, n, INPUTS_STEP)
        parts.append(method._run(x[start:stop], rows(start, stop)))

    runtime.run_chunked(n, per_input, size, step, INPUTS_STEP)
    runtime.checkpoint(n, n, INPUTS_STEP)
    return concat(parts)


def _in_chunks_of(
    method: Method, x: Tensor, target: Target, rows: Rows | None, size: int
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
