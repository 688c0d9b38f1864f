"""Sanity check by cascading model-parameter randomisation (Adebayo et al. 2018).

The layers that own parameters are ordered as the forward pass calls them; from the logits
layer down, stage after stage, their parameters are replaced **in place** by Gaussian noise
with the mean and standard deviation of each tensor's original values (buffers such as
batch-norm statistics are kept), and the method's maps on the same inputs, for the classes
the *original* model predicted, are compared with the original maps by Spearman rank
correlation and SSIM (both maps min-max normalised per sample first, so SSIM's data range is
1 whatever scale the explainer returns). A method passes when the similarity drops: lower is
better.

The model's parameters are restored bitwise afterwards, also when the explainer raises.
Works on 3-D volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.capture import eval_mode, record_calls
from evidencemap.checks import check_inputs, check_model
from evidencemap.maps import normalize
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
from evidencemap.metrics.similarity import spearman, ssim
from evidencemap.targets import OutputKey, Target

__all__ = ["ModelRandomisation", "RandomisationResult", "parameter_layers"]


def parameter_layers(model: nn.Module, inputs: Tensor, output_key: OutputKey = None) -> list[str]:
    """Dotted names of the modules owning parameters, in the order a forward pass calls them.

    Modules with parameters that the forward pass does not call are left out.
    """
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    names = {m: n for n, m in model.named_modules()}
    with eval_mode(model), torch.no_grad(), record_calls(owners) as calls:
        model(inputs[:1])
    order: list[str] = []
    for module, _ in calls:
        if names[module] not in order:
            order.append(names[module])
    return order


@dataclass
class RandomisationResult:
    """Similarity of the maps after each cascading stage to the original maps.

    Attributes:
        layers: for each stage, the deepest layer randomised so far (stage ``j`` randomised
            every layer from the logits down to it).
        spearman: ``(N, stages)`` Spearman rank correlation.
        ssim: ``(N, stages)`` structural similarity.
        original: ``(N, 1, *S)`` the maps of the original model.
    """

    layers: list[str]
    spearman: Tensor
    ssim: Tensor
    original: Tensor


@register_metric
class ModelRandomisation(Metric):
    """Cascading parameter randomisation; lower similarity is better.

    Args:
        model: the model the explainer explains (randomised in place, then restored).
        stages: ``None`` randomises one more layer per stage (every layer); an int groups the
            layers into that many cumulative stages of (nearly) equal size.
        seed: seed of the random parameters.
        output_key: which model output to read for the original classes.
    """

    name = "sanity"
    higher_is_better = False
    directions: ClassVar[dict[str, bool]] = {"sanity_spearman": False, "sanity_ssim": False}
    titles: ClassVar[dict[str, str]] = {
        "sanity_spearman": "Rand. Spearman",
        "sanity_ssim": "Rand. SSIM",
    }
    needs = frozenset({"explainer"})
    OPTIONS = (
        Option(
            "stages",
            "int",
            None,
            "cumulative randomisation stages (None: one per layer)",
            low=1,
            nullable=True,
            cost="work",
        ),
        SEED,
    )
    EVALUATION: ClassVar[dict[str, Any]] = {"stages": 10}
    QUICK: ClassVar[dict[str, Any]] = {"stages": 2}

    def __init__(
        self,
        model: nn.Module,
        *,
        stages: int | None = None,
        seed: int = 0,
        output_key: OutputKey = None,
    ) -> None:
        self.model = check_model(model)
        self.stages = self.option("stages", stages)
        self.seed = self.option("seed", seed)
        self.output_key = output_key

    def __call__(
        self, inputs: Tensor, explainer: Explainer, target: Target = None
    ) -> RandomisationResult:
        """Run the cascade; ``explainer(inputs, target)`` must explain this metric's model.

        Raises:
            TypeError / ValueError: for invalid arguments, or a model without parameters.
        """
        x = check_inputs(inputs).detach()
        explainer = check_explainer(explainer)
        with eval_mode(self.model), torch.no_grad():
            scorer, _ = make_scorer(self.model, x, target, output_key=self.output_key)
        fixed = scorer.target()
        layers = parameter_layers(self.model, x, self.output_key)[::-1]
        if not layers:
            raise ValueError("the model has no parameters that its forward pass uses")
        count = len(layers) if self.stages is None else min(self.stages, len(layers))
        ends = [round((j + 1) * len(layers) / count) for j in range(count)]
        original = run_explainer(explainer, x, fixed)
        params = dict(self.model.named_parameters())
        saved = {name: p.detach().clone() for name, p in params.items()}
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        rho, sim, names = [], [], []
        try:
            done = 0
            for end in ends:
                with torch.no_grad():
                    for layer in layers[done:end]:
                        module = self.model.get_submodule(layer)
                        for p in module.parameters(recurse=False):
                            _randomise_(p, gen)
                done = end
                maps = run_explainer(explainer, x, fixed)
                rho.append(spearman(original, maps))
                sim.append(ssim(normalize(original), normalize(maps)))
                names.append(layers[end - 1])
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        return RandomisationResult(names, torch.stack(rho, 1), torch.stack(sim, 1), original)

    def score(self, context: MetricContext) -> MetricRecord:
        """Mean Spearman and SSIM over the stages for one image."""
        result = self(context.inputs, context.explainer, context.target)
        return MetricRecord(
            {
                "sanity_spearman": float(result.spearman[0].mean()),
                "sanity_ssim": float(result.ssim[0].mean()),
            }
        )


def _randomise_(p: Tensor, gen: torch.Generator) -> None:
    """Replace ``p`` in place by noise with its own mean and standard deviation.

    A constant tensor (standard deviation 0) gets ``|mean|`` as its standard deviation.
    """
    flat = p.detach().double()
    mean = float(flat.mean())
    std = float(flat.std()) if p.numel() > 1 else 0.0
    if std == 0:  # e.g. an untrained norm layer's ones: keep the scale, lose the value
        std = abs(mean)
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    p.copy_((mean + std * noise).to(p.device, p.dtype))
