"""FGVis (Wagner et al., CVPR 2019): fine-grained evidence by optimising a per-pixel mask.

A mask ``m ∈ [0, 1]^{N×C×S}`` (one value per pixel *and* per channel, full resolution) mixes
the input ``x`` with a reference ``r`` (zero in the model's normalised input space by default):

    e = m ⊙ x + (1 − m) ⊙ r                    (the explanation, a valid model input)

With ``p(e) = softmax(f(e))_c`` the target's probability and ``‖m‖ = mean(m)`` (the L1 norm
divided by ``C·|S|``, so λ does not depend on the resolution or the channel count):

* preservation game: ``min_m  φ(e) + λ‖m‖``   keep the class with as few pixels as possible;
* deletion game:     ``min_m −φ(e) − λ‖m‖``   remove as few pixels as possible so that it falls;

``φ(e) = −log p(e)`` (``similarity="ce"``, cross-entropy to the target class) or ``−p(e)``
(``similarity="prob"``). The mask starts at 1 (``e = x``) and takes projected gradient steps,
clamped to [0, 1] after every step.

**λ per sample** (``lam="auto"``, the default): inside one batched run, each sample's λ rises by
the factor ``1 + lam_rate`` after an iteration whose explanation satisfies the game's criterion
and falls by it otherwise; the sparsest iterate that satisfied the criterion is returned with the
λ and the score it really had:

* preservation: ``p(e) ≥ (1 − tolerance) · p(x)`` (default tolerance 1 %);
* deletion: ``p(e) ≤ delete_to · p(x)`` (default a tenth of the image's probability).

A number ``lam=λ`` fixes λ instead (the last iterate is returned).

**The defence against adversarial evidence** (``defence=True``; the former spelling
``defense`` still works, with a ``DeprecationWarning``): after every elementwise nonlinearity
*call* ``h`` of the model (module or functional; a module reused ``k`` times in one forward pass
gets ``k`` sets of bounds) an identity is inserted whose backward pass lets the
gradient through only where ``min(0, h(x)) ≤ h(e) ≤ max(0, h(x))`` — bounds from one clean,
detached forward pass of ``x``, inclusive comparisons. A nonlinearity whose output *is* the
model's output is not filtered. The forward pass is never altered, so every reported score is the
real model's; only the gradient of ``φ`` through the network is filtered, the sparsity gradient
``±λ / (C·|S|)`` acts on ``m`` directly.

The update is SGD with momentum on a per-sample normalised gradient,
``v ← μ v + g / max|g|``, ``m ← clamp(m − η v, 0, 1)``: the largest entry moves by ``η`` per step
whatever the model's gradient scale, which makes one learning rate work across images and models.

**The schedule** (``schedule="auto"``, the default). On networks with additive offsets
(convolution biases, batch-norm shifts) the defence blocks almost all of the gradient as soon as
``e ≠ x`` and the preservation mask degenerates to uniform dimming (see
:mod:`~evidencemap.methods.fgvis.diagnostics`). Each run measures the share of the gradient the
defence passes before it optimises; ``"auto"`` keeps the paper's rule where it is at least
``STARVED_SHARE`` (and for the generation game, and without the defence) and runs the localising
schedule (``schedule="coarse"``) where it starves. That schedule splits ``max_iterations``
between two stages and first optimises a single-channel mask of ``coarse_size`` cells per axis, bilinearly
upsampled to the input, with the same game, criterion and λ schedule but *without* the gate: a
smooth mask of a few dozen cells cannot encode an imperceptible adversarial pattern, so the low
resolution plays the defence's part there. A kept preservation iterate must also keep
``NOISE_FLOOR·p(x)`` on each of ``JUDGE_DRAWS`` fixed draws of Gaussian noise on ``e``
(σ = ``noise``, or 0.1 when ``noise=0``), so that it does not keep the class with a mask of a
few per cent of contrast that any noise destroys; the preservation game's gradient passes
themselves see noise only when ``noise > 0`` (training against noise keeps contrast wherever
dimming costs the class little, and the map comes out flat), while the deletion and
generation games, which the floor does not guard, are trained against it. The full-resolution, per-channel mask is then
refined from that answer (λ continued) with the defence as set, held to the same floor. Every such result reports a noise check
and a cross-model check (``noise_ratio``, ``transfer_ratio``) so brittle masks show.

Modules: :mod:`~.defence` (bounds, gate), :mod:`~.games` (φ, criteria), :mod:`~.optimiser`
(mask state, step, λ schedule, backtracking), :mod:`~.reference`, :mod:`~.diagnostics`,
:mod:`~.method` (the :class:`FGVis` class and its run loop).
"""

from evidencemap.methods.fgvis.defence import DefenceRule, NonlinearityBounds, record_bounds
from evidencemap.methods.fgvis.diagnostics import (
    DEGENERATE_SPREAD,
    FGVisDegenerateWarning,
    FGVisWarning,
    map_spread,
)
from evidencemap.methods.fgvis.games import FGVIS_GAMES, FGVIS_SIMILARITIES, NOISE_FLOOR
from evidencemap.methods.fgvis.method import FGVIS_MASK_CHANNELS, FGVIS_SCHEDULES, FGVis, Progress
from evidencemap.methods.fgvis.reference import FGVIS_REFERENCES, gaussian_blur

__all__ = [
    "DEGENERATE_SPREAD",
    "FGVIS_GAMES",
    "FGVIS_MASK_CHANNELS",
    "FGVIS_REFERENCES",
    "FGVIS_SCHEDULES",
    "FGVIS_SIMILARITIES",
    "NOISE_FLOOR",
    "DefenceRule",
    "FGVis",
    "FGVisDegenerateWarning",
    "FGVisWarning",
    "NonlinearityBounds",
    "Progress",
    "gaussian_blur",
    "map_spread",
    "record_bounds",
]
