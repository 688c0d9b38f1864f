"""Max-sensitivity (Yeh et al. 2019), Monte-Carlo estimate with Captum's defaults.

``SENS_max(Φ, x) = max_j ‖Φ(x + δ_j) − Φ(x)‖_F`` over ``samples`` perturbations ``δ_j`` drawn
uniformly from the ``L∞`` ball of radius ``r`` (each input value moved by ``U(−r, r)``; Captum's
default perturbation), default ``r = 0.02``, 10 samples. ``Φ`` is the explainer's map
``(1, *S)`` as it returns it (the library's methods: normalised to [0, 1] per sample) for the
class predicted on the *unperturbed* input. With ``relative=True`` each norm is divided by
``‖Φ(x)‖_F`` (by 1 where that is 0), which is what ``captum.metrics.sensitivity_max``
reports. Lower is better; a constant explainer scores 0. All ``N · samples`` perturbed inputs go to the explainer in chunks of
``batch_size``. Works on 3-D volumes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.capture import eval_mode
from evidencemap.checks import check_inputs, check_model
from evidencemap.methods.options import Option
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import (
    SEED,
    Explainer,
    Metric,
    check_explainer,
    make_scorer,
    run_explainer,
)
from evidencemap.targets import OutputKey, Target

__all__ = ["MaxSensitivity"]


@register_metric
class MaxSensitivity(Metric):
    """Max-sensitivity of an explainer under small input noise; lower is better.

    Args:
        model: the model (to fix the classes on the unperturbed inputs).
        radius: ``r``, the largest change of any input value.
        samples: Monte-Carlo samples per input.
        batch_size: perturbed inputs per explainer call (``None``: all at once).
        seed: seed of the perturbations.
        output_key: which model output to read.
        relative: divide by ``‖Φ(x)‖_F`` (Captum's ``sensitivity_max``); default the absolute
            ``max_j ‖Φ(x + δ_j) − Φ(x)‖_F`` of Yeh et al.
    """

    name = "max_sensitivity"
    higher_is_better = False
    directions: ClassVar[dict[str, bool]] = {"max_sensitivity": False}
    titles: ClassVar[dict[str, str]] = {"max_sensitivity": "Max-sensitivity"}
    needs = frozenset({"explainer"})
    OPTIONS = (
        Option("radius", "float", 0.02, "largest change of any input value", low=0),
        Option("samples", "int", 10, "Monte-Carlo samples per input", low=1, cost="work"),
        Option(
            "batch_size",
            "int",
            None,
            "perturbed inputs per explainer call (None: all at once)",
            low=1,
            nullable=True,
            cost="chunk",
        ),
        SEED,
        Option("relative", "bool", False, "divide by the norm of the unperturbed map"),
    )
    QUICK: ClassVar[dict[str, Any]] = {"samples": 2}
    run_settings = ("seed",)

    def __init__(
        self,
        model: nn.Module,
        *,
        radius: float = 0.02,
        samples: int = 10,
        batch_size: int | None = None,
        seed: int = 0,
        output_key: OutputKey = None,
        relative: bool = False,
    ) -> None:
        self.model = check_model(model)
        self.radius = self.option("radius", radius)
        self.samples = self.option("samples", samples)
        self.batch_size = self.option("batch_size", batch_size)
        self.seed = self.option("seed", seed)
        self.output_key = output_key
        self.relative = self.option("relative", relative)

    def __call__(self, inputs: Tensor, explainer: Explainer, target: Target = None) -> Tensor:
        """``(N,)`` max-sensitivity of ``explainer`` at ``inputs``.

        Raises:
            TypeError / ValueError: for invalid arguments.
        """
        x = check_inputs(inputs).detach()
        explainer = check_explainer(explainer)
        n = x.shape[0]
        with eval_mode(self.model), torch.no_grad():
            scorer, _ = make_scorer(self.model, x, target, output_key=self.output_key)
        fixed = scorer.target()
        base = run_explainer(explainer, x, fixed)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.rand((self.samples, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + (2 * noise - 1) * self.radius).flatten(0, 1)  # (S·N, C, *S)
        rows = self.samples * n
        tiled = fixed.repeat(self.samples) if isinstance(fixed, Tensor) else fixed
        chunk = rows if self.batch_size is None else self.batch_size
        maps = []
        for s in range(0, rows, chunk):
            part = tiled[s : s + chunk] if isinstance(tiled, Tensor) else tiled
            maps.append(run_explainer(explainer, noisy[s : s + chunk], part))
        diff = torch.cat(maps).view(self.samples, n, -1) - base.view(1, n, -1)
        sensitivity = diff.double().norm(dim=2).amax(0)
        if self.relative:
            scale = base.double().flatten(1).norm(dim=1)
            sensitivity = sensitivity / scale.where(scale > 0, torch.ones_like(scale))
        return sensitivity.float()

    def score(self, context: MetricContext) -> MetricRecord:
        """The max-sensitivity of the method at one image."""
        value = self(context.inputs, context.explainer, context.target)
        return MetricRecord({"max_sensitivity": float(value[0])})
