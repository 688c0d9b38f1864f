"""The result of every method: maps, their raw form, the targets and the model's scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Explanation", "ExplanationImage"]


@dataclass
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


@dataclass
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
