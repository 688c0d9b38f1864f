"""The result of every method: maps, their raw form, the targets and the model's scores.

The core never imports the edges (``io``, ``viz``, ``cli``, ``server``). The one deliberate
exception is the notebook helpers :meth:`Explanation.plot`, :meth:`Explanation.show` and
:meth:`Explanation._repr_png_`: they reach :mod:`evidencemap.viz` through
:func:`importlib.import_module` by name when called, so importing the core never imports
matplotlib and no import of ``viz`` appears in the core's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["Explanation", "ExplanationImage", "effective_options"]


_VIZ = "evidencemap.viz"  # the edge module the notebook helpers draw with
_REPR_ITEMS = 4  # per-sample values a repr lists before "…"
_REPR_OPTIONS = 120  # characters of options a repr shows before "…"


def _shape(value: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in value.shape) + ")"


def _values(value: Tensor | None, integer: bool) -> str:
    if value is None:
        return "None"
    flat = value.detach().flatten()
    shown = flat[:_REPR_ITEMS].cpu().tolist()
    text = ", ".join(str(int(v)) if integer else f"{float(v):.4g}" for v in shown)
    return "[" + text + (", …" if flat.numel() > _REPR_ITEMS else "") + "]"


def _options_text(options: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in options.items())
    if len(text) > _REPR_OPTIONS:
        text = text[: _REPR_OPTIONS - 1].rstrip(", ") + "…"
    return "{" + text + "}"


def effective_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with those of a wrapped method merged in (SmoothGrad's ``method_options``),
    the wrapper's own taking precedence."""
    inner = options.get("method_options")
    return {**inner, **options} if isinstance(inner, dict) else dict(options)


@dataclass(repr=False)
class ExplanationImage:
    """The image a method returns as its explanation (FGVis), for one sample.

    Attributes:
        kind: ``"explanation"`` (``e``, the preservation game) or ``"deleted"`` (the deleted
            evidence, the deletion game).
        image: ``(C, *S)`` in the model's input space.
        score: the model's probability of the target on ``e`` (deletion game: on the input
            with the evidence removed), ``None`` when the method did not report it.
        top1: the model's top-1 class on ``e``, or ``None``.
    """

    kind: str
    image: Tensor
    score: float | None
    top1: int | None

    def __repr__(self) -> str:
        return (
            f"ExplanationImage(kind={self.kind!r}, image={_shape(self.image)}, "
            f"score={self.score!r}, top1={self.top1!r})"
        )


@dataclass(repr=False)
class Explanation:
    """What a method found, on the inputs' device.

    Attributes:
        maps: ``(N, 1, *input_spatial)`` float maps at input resolution, each sample min-max
            normalised to [0, 1]; a flat map is all zeros. FGVis is the one exception: its map
            is the channel mean of its mask, already in [0, 1] and not rescaled (a mask of 0.18
            everywhere stays 0.18, so a flat mask never looks like localised evidence).
        raw: the map before normalisation, at the layer's resolution ``(N, 1, *layer_spatial)``
            (for several layers, a list of them; for pixel-space methods, input resolution).
        targets: ``(N,)`` class indices when the target was a class, else ``None``.
        scores: ``(N,)`` the target score of the model on the inputs.
        method: the method's name.
        layer: the dotted name of the explained layer (a list for several), ``None`` when the
            method works in input space.
        options: the options the method ran with.
        output: the model's output on the inputs (detached), e.g. ``(N, classes)`` logits.
        extras: method-specific results (FGVis masks and explanation images, IG completeness, …).
    """

    maps: Tensor
    raw: Tensor | list[Tensor]
    targets: Tensor | None
    scores: Tensor
    method: str
    layer: str | list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    output: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def __repr__(self) -> str:
        """One short line: method, layer, shapes, targets, scores and options; never a tensor's
        values beyond the first few targets and scores."""
        if isinstance(self.raw, list):
            raw = "[" + ", ".join(_shape(r) for r in self.raw) + "]"
        else:
            raw = _shape(self.raw)
        extras = f", extras={sorted(self.extras)}" if self.extras else ""
        return (
            f"Explanation(method={self.label!r}, layer={self.layer!r}, "
            f"maps={_shape(self.maps)} {str(self.maps.dtype).replace('torch.', '')} "
            f"on {self.maps.device}, raw={raw}, targets={_values(self.targets, True)}, "
            f"scores={_values(self.scores, False)}, options={_options_text(self.options)}"
            f"{extras})"
        )

    __str__ = __repr__

    @property
    def label(self) -> str:
        """The method's name with the variant its options select, for titles and reports.

        ``"counterfactual gradcam"`` (``counterfactual=True``: evidence *against* the target),
        ``"gradcam (relu=False)"`` (signed map), ``"saliency (abs=False)"`` (signed gradient),
        ``"integrated_gradients (sign='absolute')"``, ``"fgvis (deletion game)"``,
        ``"smoothgrad of saliency"``; the plain name otherwise.
        """
        options = self.options
        name = self.method
        inner = options.get("method")
        if isinstance(inner, str) and isinstance(options.get("method_options"), dict):
            name = f"{name} of {inner}"
        merged = effective_options(options)
        if merged.get("counterfactual") is True:
            name = f"counterfactual {name}"
        notes = []
        if merged.get("relu") is False:
            notes.append("relu=False")
        if merged.get("abs") is False:
            notes.append("abs=False")
        if merged.get("sign") == "absolute":
            notes.append("sign='absolute'")
        if merged.get("game") == "delete":
            notes.append("deletion game")
        return f"{name} ({', '.join(notes)})" if notes else name

    def numpy(self, raw: bool = False) -> np.ndarray | list[np.ndarray]:
        """The maps (or, with ``raw=True``, the raw maps) as float32 NumPy arrays on the CPU.

        Returns:
            ``maps``: ``(N, 1, *S)`` (``exp.numpy()[i, 0]`` is sample ``i``'s map); ``raw``:
            ``(N, C, *s)``, or one array per layer for several layers.
        """

        def convert(value: Tensor) -> np.ndarray:
            return value.detach().cpu().float().numpy()

        if not raw:
            return convert(self.maps)
        if isinstance(self.raw, list):
            return [convert(r) for r in self.raw]
        return convert(self.raw)

    # -- notebook helpers: drawn by evidencemap.viz, reached by name (see the module docstring)

    @staticmethod
    def _viz() -> ModuleType:
        return importlib.import_module(_VIZ)

    def plot(self, image: Any = None, **kwargs: Any) -> Any:
        """Draw sample ``index`` (default 0) as the command line does, in one call: see
        :func:`evidencemap.viz.plot` for the arguments (``image``, ``model``, ``ax``,
        ``signed``, ``cmap``, …). Returns the matplotlib axes drawn on."""
        return self._viz().plot(self, image, **kwargs)

    def show(self, image: Any = None, **kwargs: Any) -> None:
        """Show the figure of :meth:`plot` (inline in a notebook, else in the system's image
        viewer); see :func:`evidencemap.viz.show`."""
        self._viz().show(self, image, **kwargs)

    def _repr_png_(self) -> bytes | None:
        """The maps of the batch as a PNG, for Jupyter's rich display (``None`` when matplotlib
        is missing)."""
        try:
            viz = self._viz()
        except ImportError:
            return None
        png: bytes = viz.repr_png(self)
        return png

    def explanation_image(self, index: int) -> ExplanationImage | None:
        """Sample ``index``'s explanation image and the model's score on it; ``None`` for
        methods that return no image (every method but FGVis).

        The deletion game shows the deleted evidence (``extras["deleted"]``), otherwise the
        explanation ``e`` (``extras["explanation"]``).
        """
        kind = "deleted" if self.options.get("game") == "delete" else "explanation"

        def row(key: str) -> Tensor | None:
            value = self.extras.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == len(self):
                return value[index]
            return None

        image = row(kind)
        if image is None or image.ndim < 2:
            return None
        score, top1 = row("score"), row("top1")
        return ExplanationImage(
            kind,
            image,
            None if score is None else float(score),
            None if top1 is None else int(top1),
        )

    def warning(self, index: int) -> str | None:
        """The method's warning about sample ``index``'s map (FGVis: which schedule ran and
        why, and any problem — a trivial game, a flat map, a deletion not reached, likely
        adversarial evidence — with what to use instead), or ``None``."""
        notes = self.extras.get("notes")
        if isinstance(notes, list) and index < len(notes):
            return str(notes[index]) or None
        flags = self.extras.get("degenerate")
        text = self.extras.get("warning")
        if not text or not isinstance(flags, Tensor) or flags.ndim != 1:
            return None
        return str(text) if bool(flags[index]) else None

    def to(self, device: Any) -> Explanation:
        """A copy with every tensor moved to ``device``."""

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return Explanation(
            maps=move(self.maps),
            raw=move(self.raw),
            targets=move(self.targets),
            scores=move(self.scores),
            method=self.method,
            layer=self.layer,
            options=dict(self.options),
            output=move(self.output),
            extras=move(self.extras),
        )
