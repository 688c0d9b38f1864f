"""Targets: what score of the model an explanation explains, one score per sample.

A target is ``None`` (the top-1 class of each sample), an ``int`` (one class for all), a
sequence / 1-D tensor of ``N`` class indices, any callable from the model output to an
``(N,)`` tensor of scores, or a sequence of ``N`` callables, one per sample, each taking that
sample's output row (``output[i]``) to a scalar (pytorch-grad-cam's habit:
``[ClassifierOutputTarget(281), …]``; :class:`PerSample`). Ready-made callables cover class logits and probabilities,
counterfactual explanations, segmentation regions and embedding similarity.

Model outputs may be a tensor, a tuple/list (first element unless told otherwise) or a mapping
with ``logits`` (e.g. Hugging Face ``ModelOutput``); :func:`select_output` picks the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ClassLogit",
    "ClassProbability",
    "Counterfactual",
    "EmbeddingSimilarity",
    "PerSample",
    "ResolvedTarget",
    "SegmentationRegion",
    "Target",
    "resolve",
    "select_output",
    "target_rows",
]

ScoreFn = Callable[[Tensor], Tensor]
Target = None | int | Sequence[int] | Tensor | ScoreFn | Sequence[ScoreFn]
OutputKey = int | str | None


def select_output(output: Any, key: OutputKey = None) -> Tensor:
    """The tensor to explain in a model's ``output``.

    Args:
        output: a tensor, a tuple/list of outputs, or a mapping (``logits`` by default).
        key: index into a tuple/list or key of a mapping; ``None`` takes element 0 / ``logits``.

    Raises:
        TypeError: when no tensor can be found.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        name = "logits" if key is None else key
        if name not in output:
            raise TypeError(
                f"model output is a mapping without {name!r} (keys: {list(output)}); "
                "pass output_key= to choose one"
            )
        return select_output(output[name])
    if isinstance(output, (tuple, list)) and output:
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(output) <= index < len(output):
            raise TypeError(
                f"output_key {key!r} does not index a model output of length {len(output)}"
            )
        return select_output(output[index])
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def _class_indices(classes: int | Sequence[int] | Tensor, output: Tensor, name: str) -> Tensor:
    """``(N,)`` long tensor of class indices, validated against an ``(N, K, …)`` output."""
    n = output.shape[0]
    if isinstance(classes, bool):
        raise TypeError(f"{name} must be an int, a sequence of ints or a tensor, got bool")
    if isinstance(classes, int):
        idx = torch.full((n,), classes, dtype=torch.long, device=output.device)
    elif isinstance(classes, Tensor) or (
        isinstance(classes, Sequence) and not isinstance(classes, (str, bytes))
    ):
        idx = torch.as_tensor(classes, device=output.device)
        if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D sequence of ints, got {classes!r}")
        idx = idx.long()
        if idx.shape[0] != n:
            raise ValueError(f"{name} has {idx.shape[0]} entries but the batch has {n} samples")
    else:
        raise TypeError(
            f"{name} must be None, an int, a sequence of ints, a tensor or a callable, "
            f"got {type(classes).__name__}"
        )
    if output.ndim < 2:
        raise ValueError(
            f"a class {name} needs a model output of shape (N, classes, ...), got {tuple(output.shape)}"
        )
    k = output.shape[1]
    if bool(((idx < 0) | (idx >= k)).any()):
        raise ValueError(f"{name} has class indices outside [0, {k - 1}]: {idx.tolist()}")
    return idx


def _gather(output: Tensor, idx: Tensor) -> Tensor:
    """``output[i, idx[i]]``, summed over any remaining axes → ``(N,)``."""
    picked = output[torch.arange(output.shape[0], device=output.device), idx]
    return picked.flatten(1).sum(1) if picked.ndim > 1 else picked


@dataclass(frozen=True)
class ClassLogit:
    """Score = the logit of class ``classes`` (pre-softmax), as Grad-CAM defines it."""

    classes: int | Sequence[int] | Tensor

    def __call__(self, output: Tensor) -> Tensor:
        return _gather(output, _class_indices(self.classes, output, "target"))


@dataclass(frozen=True)
class ClassProbability:
    """Score = the softmax probability of class ``classes`` over axis 1."""

    classes: int | Sequence[int] | Tensor

    def __call__(self, output: Tensor) -> Tensor:
        return _gather(output.softmax(dim=1), _class_indices(self.classes, output, "target"))


@dataclass(frozen=True)
class Counterfactual:
    """The negated score of ``target``: evidence *against* it (Grad-CAM §3.3).

    With a CAM method the gradient is negated, ``α_k = (1/Z) Σ_ij −∂y^c/∂A^k_ij``, so the map
    shows regions whose removal would raise the score.
    """

    target: Target = None

    def __call__(self, output: Tensor) -> Tensor:
        return -resolve(self.target, output).score(output)


@dataclass(frozen=True)
class SegmentationRegion:
    """Score = the logits of class ``category`` summed over ``mask`` (semantic segmentation).

    ``output`` is ``(N, K, *S)``; ``mask`` is ``(*S)`` or ``(N, *S)``, boolean or float weights.
    """

    category: int
    mask: Tensor

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim < 3:
            raise ValueError(
                f"SegmentationRegion needs an output of shape (N, K, *S), got {tuple(output.shape)}"
            )
        idx = _class_indices(self.category, output, "category")
        region = output[torch.arange(output.shape[0], device=output.device), idx]
        mask = self.mask.to(region.device, region.dtype)
        if mask.shape not in (region.shape, region.shape[1:]):
            raise ValueError(
                f"mask must have shape {tuple(region.shape[1:])} or {tuple(region.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        return (region * mask).flatten(1).sum(1)


@dataclass(frozen=True)
class EmbeddingSimilarity:
    """Score = cosine similarity of the output embedding ``(N, D)`` to ``reference``.

    ``reference`` is ``(D,)`` (one for all) or ``(N, D)``; any trailing axes are flattened.
    """

    reference: Tensor

    def __call__(self, output: Tensor) -> Tensor:
        emb = output.flatten(1)
        ref = self.reference.to(emb.device, emb.dtype)
        ref = ref.reshape(1, -1) if ref.ndim == 1 else ref.flatten(1)
        if ref.shape[1] != emb.shape[1] or ref.shape[0] not in (1, emb.shape[0]):
            raise ValueError(
                f"reference must be ({emb.shape[1]},) or ({emb.shape[0]}, {emb.shape[1]}), "
                f"got {tuple(self.reference.shape)}"
            )
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=1)


@dataclass(frozen=True)
class PerSample:
    """One score function per sample: score ``i`` is ``fns[i](output[i])``, a scalar.

    What a sequence of callables passed as ``target`` becomes (pytorch-grad-cam's
    ``targets=[ClassifierOutputTarget(281), …]``: each callable sees its own sample's output row,
    ``(K,)`` for a classifier, and returns a 0-d or one-element tensor).
    """

    fns: tuple[ScoreFn, ...]

    def __call__(self, output: Tensor) -> Tensor:
        if len(self.fns) != output.shape[0]:
            raise ValueError(
                f"target has {len(self.fns)} callables but the batch has {output.shape[0]} samples"
            )
        scores = []
        for i, fn in enumerate(self.fns):
            value = fn(output[i])
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"target callable {i} must return one score (a scalar tensor) for its "
                    f"sample's output row {tuple(output[i].shape)}; got {shape}"
                )
            scores.append(value.reshape(()))
        return torch.stack(scores)


def _callables(target: Any) -> tuple[ScoreFn, ...] | None:
    """The callables of a sequence of per-sample targets, or ``None`` for a sequence without
    any (class indices).

    Raises:
        TypeError: for a sequence that mixes callables with other values.
    """
    if isinstance(target, Tensor) or not isinstance(target, Sequence) or isinstance(target, str):
        return None
    found = [callable(t) and not isinstance(t, Tensor) for t in target]
    if not any(found):
        return None
    if not all(found):
        kinds = sorted({type(t).__name__ for t, ok in zip(target, found, strict=True) if not ok})
        raise TypeError(
            "target must be class indices or one callable per sample, not a mix: got "
            f"callables with {', '.join(kinds)}"
        )
    return tuple(target)


@dataclass(frozen=True)
class ResolvedTarget:
    """A target made concrete for one batch: its score function and class indices if any."""

    score: ScoreFn
    classes: Tensor | None


def resolve(target: Target, output: Tensor) -> ResolvedTarget:
    """Make ``target`` concrete for the batch whose model output is ``output``.

    ``None`` → the arg-max class of each sample (on axis 1); ``int``/sequence → those classes,
    scored by their logit; a callable is used as is and must return ``(N,)`` scores.

    Raises:
        TypeError: for a target of another type.
        ValueError: for class indices out of range or a count different from the batch size.
    """
    n = output.shape[0]
    if target is None:
        if output.ndim < 2:
            raise ValueError(
                "target=None takes the top-1 class, which needs an output of shape (N, classes); "
                f"got {tuple(output.shape)}: pass a callable target"
            )
        top = output.detach().flatten(2).sum(2) if output.ndim > 2 else output.detach()
        target = top.argmax(dim=1)
    if isinstance(target, (ClassLogit, ClassProbability)):
        return ResolvedTarget(_checked(target, n), _class_indices(target.classes, output, "target"))
    if isinstance(target, Counterfactual):
        inner = resolve(target.target, output)
        return ResolvedTarget(
            _checked(
                Counterfactual(inner.classes if inner.classes is not None else target.target), n
            ),
            inner.classes,
        )
    if callable(target) and not isinstance(target, Tensor):
        return ResolvedTarget(_checked(target, n), None)
    fns = _callables(target)
    if fns is not None:
        if len(fns) != n:
            raise ValueError(f"target has {len(fns)} callables but the batch has {n} samples")
        return ResolvedTarget(_checked(PerSample(fns), n), None)
    idx = _class_indices(target, output, "target")  # type: ignore[arg-type]
    return ResolvedTarget(_checked(ClassLogit(idx), n), idx)


def _checked(fn: ScoreFn, n: int) -> ScoreFn:
    """Wrap ``fn`` so that a result that is not ``(N,)`` raises a clear error."""

    def score(output: Tensor) -> Tensor:
        value = fn(output)
        if not isinstance(value, Tensor) or value.shape != (n,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"the target must give one score per sample, shape ({n},); got {shape}"
            )
        return value

    return score


Rows = Callable[[int, int], Target]
"""``rows(start, stop)``: the target of the rows ``start:stop`` of a batch."""


def target_rows(target: Target, n: int, spatial_ndim: int) -> Rows | None:
    """How a batch of ``n`` samples with ``spatial_ndim`` spatial axes passes ``target`` to a
    chunk of its rows: ``rows(start, stop)``, or ``None`` when the rows cannot be told apart.

    ``None`` and an ``int`` are the same for every chunk; ``n`` class indices (a sequence or a
    1-D tensor) are sliced, and so are the per-sample parts of this module's targets (the
    classes of :class:`ClassLogit` / :class:`ClassProbability`, a :class:`SegmentationRegion`
    mask ``(N, *S)``, an :class:`EmbeddingSimilarity` reference ``(N, D)``, the target inside a
    :class:`Counterfactual`). ``None`` is returned for any other callable (a score function of
    the whole output) and for indices that do not number ``n`` (whose error the whole batch
    reports).
    """

    def same(start: int, stop: int) -> Target:
        return target

    if target is None or isinstance(target, int):
        return same
    if isinstance(target, Tensor) or (
        isinstance(target, Sequence) and not isinstance(target, (str, bytes))
    ):
        if isinstance(target, Tensor) and target.ndim == 0:
            return same
        if len(target) != n:
            return None
        return lambda start, stop: target[start:stop]
    if isinstance(target, (ClassLogit, ClassProbability)):
        inner = target_rows(target.classes, n, spatial_ndim)
        if inner is None:
            return None
        kind = type(target)
        classes_of: Rows = inner
        return lambda start, stop: kind(classes_of(start, stop))  # type: ignore[arg-type]
    if isinstance(target, PerSample):
        fns = target.fns
        if len(fns) != n:
            return None
        return lambda start, stop: PerSample(fns[start:stop])
    if isinstance(target, Counterfactual):
        inner = target_rows(target.target, n, spatial_ndim)
        if inner is None:
            return None
        return lambda start, stop: Counterfactual(inner(start, stop))
    if isinstance(target, SegmentationRegion):
        mask = target.mask
        if mask.ndim == spatial_ndim:
            return same
        if mask.ndim != spatial_ndim + 1 or mask.shape[0] != n:
            return None
        return lambda start, stop: SegmentationRegion(target.category, mask[start:stop])
    if isinstance(target, EmbeddingSimilarity):
        ref = target.reference
        if ref.ndim <= 1 or ref.shape[0] == 1:
            return same
        if ref.shape[0] != n:
            return None
        return lambda start, stop: EmbeddingSimilarity(ref[start:stop])
    return None
