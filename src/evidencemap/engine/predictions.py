"""What the model said: embedding or classifier, class probabilities, the top classes of a
batch (what every manifest lists)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from evidencemap.models.loading import LoadedModel

__all__ = [
    "is_embedding",
    "probabilities",
    "top_predictions",
]


def is_embedding(loaded: LoadedModel) -> bool:
    """Whether the model outputs an embedding rather than class scores (the built-in volume
    models of :data:`evidencemap.models.CT_MODELS`): no classes, no probabilities."""
    from evidencemap.models import CT_MODELS

    return loaded.source == "builtin" and loaded.name in CT_MODELS


def probabilities(output: Tensor) -> Tensor | None:
    """Softmax over classes of an ``(N, K)`` output with ``K > 1``; ``None`` otherwise."""
    if output.ndim == 2 and output.shape[1] > 1:
        return torch.softmax(output.detach().float(), dim=1)
    return None


def top_predictions(output: Tensor, loaded: LoadedModel, k: int = 5) -> list[list[dict[str, Any]]]:
    """Per sample, the ``k`` highest classes: ``{"class", "label", "probability", "logit"}``.

    Outputs that are not ``(N, K)`` class scores, and embeddings (:func:`is_embedding`), give
    empty lists.
    """
    probs = None if is_embedding(loaded) else probabilities(output)
    if probs is None:
        return [[] for _ in range(output.shape[0])]
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    logits = output.detach().float().gather(1, indices)
    return [
        [
            {
                "class": int(c),
                "label": loaded.label(int(c)),
                "probability": float(p),
                "logit": float(z),
            }
            for c, p, z in zip(ci.tolist(), pi.tolist(), zi.tolist(), strict=True)
        ]
        for ci, pi, zi in zip(indices, values, logits, strict=True)
    ]
