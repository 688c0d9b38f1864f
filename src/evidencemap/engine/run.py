"""Explaining: one call of the method on a batch of items (:func:`explain_items`, with
``top_k`` and the method's warnings collected), and a list of inputs read and explained a batch
at a time, each input's failure reported alone (:func:`run_inputs`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from evidencemap.engine.items import Item, prepare
from evidencemap.engine.outputs import Result, _Batch, _write_item
from evidencemap.engine.predictions import is_embedding, probabilities, top_predictions
from evidencemap.engine.settings import Settings
from evidencemap.explanation import Explanation
from evidencemap.models.loading import LoadedModel
from evidencemap.targets import Target

__all__ = [
    "Failure",
    "explain_items",
    "run_inputs",
]


_PREDICTIONS = 5  # classes listed in every manifest


@dataclass
class Failure:
    """An input that could not be explained, and why."""

    path: Path
    message: str


def _classes_to_explain(settings: Settings, x: Tensor) -> tuple[Target, int]:
    """Targets for the explain call and how many maps each input gets."""
    if settings.top_k is None:
        return settings.target, 1
    with torch.no_grad():
        output = settings.method.forward(x)
    if output.ndim != 2:
        raise ValueError(f"top_k needs (N, classes) model outputs, got shape {tuple(output.shape)}")
    k = min(settings.top_k, output.shape[1])
    classes = output.topk(k, dim=1).indices
    return classes.flatten().tolist(), k


_PASSED_ON = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning)


def _call_method(
    settings: Settings, inputs: Tensor, target: Target
) -> tuple[Explanation, list[str]]:
    """Call the method; the warnings it raises come back as messages (reported once with the
    results), except deprecations, which are passed on as they were."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = settings.method(inputs, target)
    messages = []
    for w in caught:
        if issubclass(w.category, _PASSED_ON):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            messages.append(str(w.message))
    return explanation, messages


def explain_items(items: Sequence[Item], loaded: LoadedModel, settings: Settings) -> list[Result]:
    """Explain ``items`` in one call of the method and write their files.

    All items must have model inputs of one shape. With ``top_k`` the inputs are repeated ``K``
    times so that one call explains every (input, class) pair with per-sample targets. The
    warnings the method raises are not printed: they come back in each :class:`Result` (and
    its manifest), once.

    Returns:
        One :class:`Result` per item, in order.
    """
    if not items:
        return []
    device = next(loaded.module.parameters(), torch.empty(0)).device
    x = torch.stack([item.tensor for item in items]).to(device)
    start = time.perf_counter()
    targets, k = _classes_to_explain(settings, x)
    inputs = x.repeat_interleave(k, dim=0) if k > 1 else x
    explanation, messages = _call_method(settings, inputs, targets)
    seconds = time.perf_counter() - start
    output = explanation.output
    if output is None:
        raise ValueError(f"method {settings.method_name!r} did not report the model output")
    batch = _Batch(
        explanation=explanation,
        k=k,
        seconds=seconds,
        device=device,
        predictions=top_predictions(output[::k], loaded, _PREDICTIONS),
        probs=None if is_embedding(loaded) else probabilities(output),
        warnings=messages,
    )
    return [
        _write_item(i, item, batch, len(items), loaded, settings) for i, item in enumerate(items)
    ]


def run_inputs(
    paths: Sequence[Path],
    bases: Sequence[Path],
    loaded: LoadedModel,
    settings: Settings,
    batch_size: int,
    on_result: Callable[[Result], None],
    on_failure: Callable[[Failure], None],
) -> None:
    """Explain ``paths`` ``batch_size`` at a time, reporting each result or failure as it comes.

    Inputs are read a batch at a time (never all at once). Within a batch, inputs whose model
    inputs have one shape go through one call of the method. A file that cannot be read fails
    alone; an error of the model or the method fails the inputs of that call; the rest goes on.
    """
    for start in range(0, len(paths), batch_size):
        groups: dict[tuple[str, tuple[int, ...]], list[Item]] = {}
        for path, base in zip(
            paths[start : start + batch_size], bases[start : start + batch_size], strict=True
        ):
            try:
                item = prepare(path, base, loaded, settings.window, settings.frame)
            except (OSError, ValueError, ImportError) as err:
                on_failure(Failure(path, str(err)))
                continue
            groups.setdefault((item.kind, tuple(item.tensor.shape)), []).append(item)
        for items in groups.values():
            try:
                results = explain_items(items, loaded, settings)
            except (RuntimeError, ValueError, TypeError, OSError) as err:
                message = (
                    f"{type(err).__name__}: {err}" if isinstance(err, RuntimeError) else str(err)
                )
                for item in items:
                    on_failure(Failure(item.path, message))
                continue
            for result in results:
                on_result(result)
