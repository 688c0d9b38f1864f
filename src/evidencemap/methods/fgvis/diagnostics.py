"""What every FGVis result says about itself: how much gradient the defence let through, how
spread the map is, whether it degenerated, and whether
its explanation survives noise and other models.

Definitions (all ``(N,)``, per sample):

* ``defence_pass_share`` ``= ‖∂φ/∂m‖_defended / ‖∂φ/∂m‖_undefended`` at the flat mask
  ``m = 0.999`` (``e = 0.999·x + 0.001·r``, 0.1 % dimming), both L2 norms over the whole mask,
  same ``φ`` and target as the run. 1 when nothing is blocked (and when the undefended gradient
  is 0); near 0 when the defence starves the optimisation.
* ``units_out_of_bounds``: at that same ``e``, the fraction of all gated nonlinearity units
  (every call, every position and channel) whose activation is outside
  ``[min(0, h(x)), max(0, h(x))]``, i.e. whose gradient the gate blocks.
* ``map_spread``: the share of the map's total mass held by its top 10 % of pixels
  (``k = ⌈P/10⌉`` of the ``P`` pixels of the ``(1, *S)`` map that can change ``e``, i.e. where
  ``x`` differs from the reference): ``k/P`` (≈ 0.1) for a flat map, 1 when all mass lies in
  those pixels. A map without mass counts as flat (``k/P``).
* ``degenerate``: ``map_spread < DEGENERATE_SPREAD`` (0.15): the map is (nearly) flat — the mask
  dims the whole image instead of selecting a region. Not checked for the generation game
  (a target that is not the top class, or ``lam=0``) nor a trivial game.
* ``reference_score`` ``p(r)`` and ``trivial``: the reference alone keeps the class
  (preservation: ``p(r) ≥ (1 − tolerance)·p(x)``, nothing to preserve) or keeps too much of it
  (deletion: ``p(r) > delete_to·p(x)``, removing everything does not delete it).
* ``noise_ratio`` ``mean_j p(e + ε_j)/p(x)``, 8 draws ``ε ~ N(0, 0.1²)``; undefended results
  whose evidence does not survive it (preservation: below ``NOISE_FLOOR``; deletion: the class
  comes back above it) are ``likely_adversarial``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from evidencemap.capture import NonlinearityInterceptor
from evidencemap.methods.fgvis.defence import DefenceRule, NonlinearityBounds
from evidencemap.methods.fgvis.games import phi

__all__ = [
    "CHECK_DRAWS",
    "CHECK_NOISE",
    "DEGENERATE_SPREAD",
    "DIAGNOSTIC_DIMMING",
    "JUDGE_DRAWS",
    "JUDGE_GROUP",
    "REASON_FLOWS",
    "REASON_GENERATION",
    "REASON_REQUESTED",
    "REASON_STARVED",
    "REASON_TRIVIAL",
    "REASON_UNDEFENDED",
    "STARVED_SHARE",
    "FGVisDegenerateWarning",
    "FGVisWarning",
    "Report",
    "defence_check",
    "degenerate_message",
    "describe",
    "map_spread",
    "noise_check",
    "transfer_check",
]

DEGENERATE_SPREAD = 0.15
"""``map_spread`` below which a map counts as flat (a flat map gives 0.1)."""
DIAGNOSTIC_DIMMING = 0.999
"""The flat mask at which the defence is measured (0.1 % dimming)."""
STARVED_SHARE = 0.1
"""``defence_pass_share`` below which the warning says that the defence starved the run."""
CHECK_NOISE = 0.1
"""σ (in the model's normalised input space) of the noise check of the coarse schedule."""
CHECK_DRAWS = 8
"""Noise draws averaged by the noise check."""
JUDGE_DRAWS = 8
"""Fixed noise draws (σ = ``noise``, or ``CHECK_NOISE`` when 0; seed ``seed + 1``) on which
the localising schedule judges a kept preservation iterate's noise floor: the minimum of
their scores. Four let the sparsest kept iterate overfit them (the cup on brick kept the class
on each of four but fell to 0.46·p(x) on the noise check's eight other draws); eight held on
every report image."""
JUDGE_GROUP = 4
"""Draws scored per sample in one batched pass; a sample already below its floor after a group
is not scored further (the outcome cannot change)."""


REASON_REQUESTED = 0
"""The schedule was named (``"fine"`` or ``"coarse"``)."""
REASON_FLOWS = 1
"""``"auto"``: the defence passes the gradient, the paper's rule runs."""
REASON_STARVED = 2
"""``"auto"``: the defence starves the gradient, the localising coarse-to-fine schedule runs."""
REASON_UNDEFENDED = 3
"""``"auto"`` without the defence: the paper's rule, undefended."""
REASON_GENERATION = 4
"""``"auto"``, generation game: the paper's rule, whose defence guards generated evidence."""
REASON_TRIVIAL = 5
"""Preservation won by the reference alone: no optimisation."""

_OFFSETS = (
    "additive offsets (convolution biases, batch-norm shifts) make activations rise when the "
    "image is dimmed"
)


class FGVisWarning(UserWarning):
    """Something about an FGVis result its reader must know (trivial game, deletion not
    reached, likely adversarial evidence)."""


class FGVisDegenerateWarning(FGVisWarning):
    """An FGVis map is flat: the defence starved the optimisation, the mask only dims."""


class _CountingRule(DefenceRule):
    """:class:`DefenceRule` that also counts, per sample, the gated units outside their bounds."""

    def __init__(
        self, bounds: list[NonlinearityBounds | None], n: int, device: torch.device
    ) -> None:
        super().__init__(bounds)
        self.outside = torch.zeros(n, device=device)
        self.total = 0

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        out = super().__call__(index, name, h)
        bound = self.bounds[index]
        if bound is not None:
            plain = h.detach()
            inside = bound.rule(plain, torch.ones_like(plain)).flatten(1).sum(1)
            self.outside += plain[0].numel() - inside
            self.total += plain[0].numel()
        return out


def defence_check(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    ref: Tensor,
    classes: Tensor,
    bounds: list[NonlinearityBounds | None],
    similarity: str,
) -> tuple[Tensor, Tensor]:
    """``(defence_pass_share, units_out_of_bounds)`` ``(N,)`` at ``m = 0.999`` (module docstring).

    Two batched forward + backward passes (one defended, one not).
    """
    n = x.shape[0]
    norms = []
    counter = _CountingRule(bounds, n, x.device)
    for defended in (True, False):
        m = torch.full_like(x, DIAGNOSTIC_DIMMING).requires_grad_(True)
        with torch.enable_grad():
            e = m * x + (1 - m) * ref
            if defended:
                with NonlinearityInterceptor(counter):
                    logits = forward(e)
            else:
                logits = forward(e)
            (grad,) = torch.autograd.grad(phi(logits, classes, similarity)[0].sum(), m)
        norms.append(grad.detach().flatten(1).norm(dim=1))
    share = torch.where(norms[1] > 0, norms[0] / norms[1].clamp(min=1e-30), 1.0)
    out = counter.outside / counter.total if counter.total else torch.zeros(n, device=x.device)
    return share, out


def map_spread(raw: Tensor, valid: Tensor | None = None) -> Tensor:
    """Share of each ``(N, 1, *S)`` map's mass in its top 10 % pixels ``(N,)`` (see above),
    over the pixels ``valid`` ``(N, 1, *S)`` (all when ``None``): ``k = ⌈P/10⌉`` of the ``P``
    valid pixels (at least 1)."""
    flat = raw.detach().flatten(1).clamp(min=0)
    if valid is None:
        count = torch.full((flat.shape[0],), flat.shape[1], device=flat.device)
    else:
        keep = valid.flatten(1)
        flat = flat * keep
        count = keep.sum(1)
    count = count.clamp(min=1)
    k = torch.ceil(count / 10).long().clamp(min=1)
    ordered = flat.sort(dim=1, descending=True).values.cumsum(1)
    top = ordered.gather(1, (k - 1)[:, None]).squeeze(1)
    total = ordered[:, -1]
    return torch.where(total > 0, top / total.clamp(min=1e-30), k / count)


def degenerate_message(
    game: str,
    rows: Sequence[int],
    spread: Tensor,
    share: Tensor | None,
    coarse: Tensor | None = None,
) -> str:
    """The warning text for the degenerate samples ``rows`` (``""`` when there are none);
    ``coarse`` ``(N,)``: the samples that already ran the localising schedule (the advice then
    does not suggest it again)."""
    if not rows:
        return ""
    which = ", ".join(str(i) for i in rows)
    worst = min(float(spread[i]) for i in rows)
    text = (
        f"FGVis: the {game} map of sample(s) {which} is flat (map_spread {worst:.3f} < "
        f"{DEGENERATE_SPREAD}; a flat map gives 0.1): the mask dims the whole image instead of "
        "selecting a region"
    )
    if share is not None:
        passed = max(float(share[i]) for i in rows)
        text += f"; the defence passes {passed:.1%} of the gradient at 0.1 % dimming"
        if passed < STARVED_SHARE:
            text += f", so the optimisation is starved ({_OFFSETS})"
    if coarse is not None and all(bool(coarse[i]) for i in rows):
        return text + (
            ". The localising schedule ran and still kept most of the image: the class holds "
            "under dimming of the whole image, so no smaller region keeps it at this tolerance. "
            "Use the defended deletion game (game='delete', and check extras['satisfied']), a "
            "larger tolerance, or a CAM-family method (method='gradcam')."
        )
    return text + (
        ". Use the localising schedule (schedule='auto' or 'coarse'), the defended deletion "
        "game (game='delete', and check extras['satisfied']), or a CAM-family method "
        "(method='gradcam')."
    )


def noise_check(
    forward: Callable[[Tensor], Tensor], e: Tensor, classes: Tensor, image_score: Tensor
) -> Tensor:
    """``mean_j p(e + ε_j) / p(x)`` ``(N,)`` over ``CHECK_DRAWS`` draws ``ε_j ~ N(0, CHECK_NOISE²)``
    of the shape of one input, shared by the batch (one generator seeded 0; one batched forward
    pass per draw), so a sample's check does not depend on the rest of its batch."""
    generator = torch.Generator(device=e.device).manual_seed(0)
    total = torch.zeros(e.shape[0], device=e.device, dtype=e.dtype)
    with torch.no_grad():
        for _ in range(CHECK_DRAWS):
            noise = torch.randn(e.shape[1:], generator=generator, device=e.device, dtype=e.dtype)
            total += phi(forward(e + CHECK_NOISE * noise), classes, "prob")[1]
    return total / CHECK_DRAWS / image_score.clamp(min=1e-30)


def transfer_check(models: Sequence[nn.Module], x: Tensor, e: Tensor, classes: Tensor) -> Tensor:
    """``p_k(e) / p_k(x)`` ``(N, K)`` for each other model ``k`` (eval mode, no gradients)."""
    columns = []
    with torch.no_grad():
        for model in models:
            p_x = phi(model(x), classes, "prob")[1]
            p_e = phi(model(e), classes, "prob")[1]
            columns.append(p_e / p_x.clamp(min=1e-30))
    if not columns:
        return torch.zeros(x.shape[0], 0, device=x.device)
    return torch.stack(columns, dim=1)


@dataclass
class Report:
    """What a result says about itself, per sample and for the batch."""

    schedules: list[str]
    reasons: list[str]
    notes: list[str]
    warning: str = ""
    warnings: list[tuple[str, type[Warning]]] = field(default_factory=list)


def _reason(code: int, coarse: bool, share: float | None, pr: float, px: float) -> str:
    """One sentence: which schedule ran on a sample and why."""
    passed = (
        "" if share is None else f"the defence passes {share:.1%} of the gradient at 0.1 % dimming"
    )
    if code == REASON_TRIVIAL:
        return (
            f"no optimisation: the reference alone scores p(r) = {pr:.3g} (p(x) = {px:.3g}): "
            "nothing to preserve"
        )
    if code == REASON_STARVED:
        return (
            f"localising coarse-to-fine schedule: only {passed} ({_OFFSETS}), so the paper's "
            "full-resolution rule would only dim the image"
        )
    if code == REASON_FLOWS:
        return f"the paper's full-resolution rule: {passed}"
    if code == REASON_UNDEFENDED:
        return "the paper's full-resolution rule, without the defence"
    if code == REASON_GENERATION:
        return (
            "the paper's full-resolution rule: generation game (the target is not the top class, "
            "or lam=0), which the paper's defence guards"
        )
    which = "the localising coarse-to-fine schedule" if coarse else "the paper's rule"
    return f"{which}, as requested" + (f" ({passed})" if passed else "")


def _rows(flags: Tensor) -> list[int]:
    return [int(i) for i in flags.nonzero().flatten()]


def _deletion_misses(
    missed: list[int], extras: dict[str, Any], ratio: Tensor, delete_to: float
) -> list[tuple[list[int], str]]:
    """The notes of the deletion runs that did not reach ``p(e) ≤ delete_to·p(x)``, one per
    cause: the localising schedule ran (``coarse``), the defence starved the paper's rule, or
    the steps ran out with the gradient flowing."""
    share = extras.get("defence_pass_share")
    groups: dict[str, list[int]] = {}
    for i in missed:
        starved = share is not None and float(share[i]) < STARVED_SHARE
        kind = "coarse" if bool(extras["coarse"][i]) else "starved" if starved else "steps"
        groups.setdefault(kind, []).append(i)
    notes = []
    for kind, rows in groups.items():
        which = ", ".join(str(i) for i in rows)
        lowest = ", ".join(f"{float(ratio[i]):.3f}" for i in rows)
        text = (
            f"FGVis: the deletion game did not reach p(e) ≤ {delete_to}·p(x) on sample(s) "
            f"{which} (p(e)/p(x) {lowest}; the returned iterate is the lowest-scoring one)"
        )
        passed = "" if share is None else ", ".join(f"{float(share[i]):.1%}" for i in rows)
        if kind == "coarse":
            text += (
                ". Why: the defence passes only "
                f"{passed} of the gradient ({_OFFSETS}), so the localising schedule ran; its "
                "coarse stage removes whole cells of the grid without the gate, and the "
                "full-resolution stage, gated by the defence, can only remove evidence whose "
                "removal lowers every activation — it could not take the score the rest of "
                "the way within max_iterations (shared by the two stages). Raise "
                "max_iterations or coarse_size, or read the map as the lowest score reached"
            )
        elif kind == "starved":
            text += (
                f": the defence passes {passed} of the gradient ({_OFFSETS}), and the gated "
                "gradient can only lower activations, so the run stalls. Use schedule='auto' "
                "(the localising schedule), or more max_iterations"
            )
        else:
            text += ": the gradient flows but the steps ran out. Raise max_iterations or lr"
        notes.append((rows, text + "."))
    return notes


def _problems(
    game: str, extras: dict[str, Any], tolerance: float, delete_to: float
) -> list[tuple[list[int], str, type[Warning]]]:
    """``(rows, message, category)`` of every problem a batch's result has."""
    out: list[tuple[list[int], str, type[Warning]]] = []
    share = extras.get("defence_pass_share")
    ratio = extras["score"] / extras["image_score"].clamp(min=1e-30)
    pr, px = extras["reference_score"], extras["image_score"]
    trivial = _rows(extras["trivial"])
    if trivial:
        which = ", ".join(str(i) for i in trivial)
        i = trivial[0]
        values = f"p(r) = {float(pr[i]):.3g} against p(x) = {float(px[i]):.3g}"
        if game == "preserve":
            text = (
                f"FGVis: sample(s) {which}: the reference alone scores {values}: nothing to "
                "preserve; use another reference (reference='blur', 'mean', a number or a tensor)"
            )
        else:
            text = (
                f"FGVis: sample(s) {which}: the reference alone scores {values}, above "
                f"delete_to·p(x): removing everything does not delete the class; use another "
                "reference (reference='blur', 'mean', a number or a tensor)"
            )
        out.append((trivial, text, FGVisWarning))
    flat = _rows(extras["degenerate"])
    if flat:
        text = degenerate_message(game, flat, extras["map_spread"], share, extras["coarse"])
        out.append((flat, text, FGVisDegenerateWarning))
    if game == "delete":
        missed = _rows(~extras["satisfied"] & ~extras["trivial"])
        for rows, text in _deletion_misses(missed, extras, ratio, delete_to):
            out.append((rows, text, FGVisWarning))
    adversarial = extras.get("likely_adversarial")
    if adversarial is not None and bool(adversarial.any()):
        rows = _rows(adversarial)
        which = ", ".join(str(i) for i in rows)
        noise = extras["noise_ratio"]
        text = (
            f"FGVis without the defence: the evidence of sample(s) {which} does not survive "
            f"noise (σ = {CHECK_NOISE}: p(e + ε)/p(x) = "
            + ", ".join(f"{float(noise[i]):.3g}" for i in rows)
            + "): likely adversarial; use defence=True."
        )
        out.append((rows, text, FGVisWarning))
    return out


def describe(game: str, extras: dict[str, Any], tolerance: float, delete_to: float) -> Report:
    """The per-sample schedule, its reason and notes, and the batch's warnings, from a joined
    result's ``extras`` (removes the helper field ``schedule_code``)."""
    codes = extras.pop("schedule_code")
    coarse = extras["coarse"]
    share = extras.get("defence_pass_share")
    pr, px = extras["reference_score"], extras["image_score"]
    n = codes.shape[0]
    schedules = [
        "none"
        if int(codes[i]) == REASON_TRIVIAL and game == "preserve"
        else ("coarse" if bool(coarse[i]) else "fine")
        for i in range(n)
    ]
    reasons = [
        _reason(
            int(codes[i]),
            bool(coarse[i]),
            None if share is None else float(share[i]),
            float(pr[i]),
            float(px[i]),
        )
        for i in range(n)
    ]
    problems = _problems(game, extras, tolerance, delete_to)
    notes = []
    for i in range(n):
        parts = [f"FGVis schedule '{schedules[i]}': {reasons[i]}."]
        parts += [text for rows, text, _ in problems if i in rows]
        notes.append(" ".join(parts))
    warning = "\n".join(text for _, text, _ in problems)
    return Report(schedules, reasons, notes, warning, [(t, c) for _, t, c in problems])
