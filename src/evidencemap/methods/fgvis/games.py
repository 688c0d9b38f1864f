"""FGVis' two games: the similarity term φ and each game's criterion.

With ``p(e) = softmax(f(e))_c`` the target's probability and ``‖m‖ = mean(m)``:

* preservation game: ``min_m  φ(e) + λ‖m‖``; criterion ``p(e) ≥ (1 − tolerance)·p(x)``;
* deletion game:     ``min_m −φ(e) − λ‖m‖``; criterion ``p(e) ≤ delete_to·p(x)``;

``φ(e) = −log p(e)`` (``similarity="ce"``) or ``−p(e)`` (``similarity="prob"``).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["FGVIS_GAMES", "FGVIS_SIMILARITIES", "NOISE_FLOOR", "criterion", "phi"]

FGVIS_GAMES = ("preserve", "delete")
NOISE_FLOOR = 0.5
"""The localising schedule's robustness floor: a kept preservation iterate must also keep
``p(e + ε) ≥ NOISE_FLOOR · p(x)`` on each of its fixed noise draws; an undefended result
whose evidence falls below it under the noise check is flagged as likely adversarial."""
FGVIS_SIMILARITIES = ("ce", "prob")


def phi(logits: Tensor, classes: Tensor, similarity: str) -> tuple[Tensor, Tensor]:
    """``(φ, p)``: the similarity term and the target probability, both ``(n,)``.

    Args:
        logits: ``(n, classes)``.
        classes: ``(n,)`` target class per row.
        similarity: ``"ce"`` (``φ = −log p``) or ``"prob"`` (``φ = −p``).

    Raises:
        ValueError: for logits that are not ``(n, classes)``.
    """
    if logits.ndim != 2:
        raise ValueError(
            f"FGVis needs a classifier output of shape (N, classes), got {tuple(logits.shape)}"
        )
    logp = logits.log_softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
    p = logp.exp()
    return (-logp if similarity == "ce" else -p), p


def criterion(
    game: str, score: Tensor, image_score: Tensor, tolerance: float, delete_to: float
) -> Tensor:
    """Whether ``score`` = p(e) ``(n,)`` meets the game's criterion relative to ``image_score``."""
    if game == "preserve":
        return score >= (1 - tolerance) * image_score
    return score <= delete_to * image_score
