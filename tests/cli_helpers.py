"""Tiny deterministic models, input files and a test-only input-space method for the CLI tests."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from evidencemap.maps import normalize
from evidencemap.methods import METHODS, Method
from evidencemap.methods.base import Context
from evidencemap.targets import resolve

# A 3-D model whose Grad-CAM map is known by hand: conv = identity (weight 1, bias 0), ReLU,
# global mean, then logits (+m, −m). For class 0 every ∂y/∂A is 1/(D·H·W) > 0, so the Grad-CAM
# map is ReLU(α·ReLU(x)) ∝ ReLU(x): after normalisation exactly ReLU(x) / max ReLU(x).
TINY3D_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Tiny3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 1, kernel_size=1)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool3d(1)
            self.fc = nn.Linear(1, 2)
            with torch.no_grad():
                self.conv.weight.fill_(1.0)
                self.conv.bias.zero_()
                self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
                self.fc.bias.zero_()

        def forward(self, x):
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


    def build():
        return Tiny3D()


    MODEL = Tiny3D()


    def not_a_model():
        return 42
    """
)


def write_photos(folder: Path) -> Path:
    """chelsea and coffee as JPEG (quality 90, like examples/), rocket as PNG in a subfolder."""
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.chelsea()).save(folder / "a_chelsea.jpg", quality=90)
    Image.fromarray(skdata.coffee()).save(folder / "b_coffee.jpg", quality=90)
    (folder / "sub").mkdir()
    Image.fromarray(skdata.rocket()).save(folder / "sub" / "rocket.png")
    return folder


def write_tiny3d_module(folder: Path, name: str = "tiny3d_models") -> str:
    """Write the Tiny3D module into ``folder`` (which the caller puts on ``sys.path``)."""
    (folder / f"{name}.py").write_text(TINY3D_SOURCE)
    return name


class Tiny2D(nn.Module):
    """conv 3→4 (3×3), ReLU, global mean, linear 4→3; seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def blob_volume(shape: tuple[int, int, int] = (12, 14, 16), centre=(5, 6, 9)) -> np.ndarray:
    """A Gaussian blob (σ = 2 voxels) on a zero background, float32."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return np.exp(-dist2 / (2 * 2.0**2)).astype(np.float32)


class InputGradient(Method):
    """Test-only input-space method: ``M = Σ_c |x_c · ∂y/∂x_c|``.

    Like FGVis it reports an explanation image: ``extras["explanation"] = x · M`` (or
    ``extras["deleted"]`` with ``game="delete"``).
    """

    name = "test-input-gradient"

    def __init__(self, model: nn.Module, *, game: str = "preserve", **kw: object) -> None:
        super().__init__(model, **kw)  # type: ignore[arg-type]
        self.game = game

    def options(self) -> dict[str, object]:
        return {**super().options(), "game": self.game}

    def explain_batch(self, inputs: Tensor, target: object) -> object:
        x = inputs.requires_grad_(True)
        with torch.enable_grad():
            output = self.forward(x)
            resolved = resolve(target, output)  # type: ignore[arg-type]
            scores = resolved.score(output)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        maps = (x.detach() * grad).abs().sum(1, keepdim=True)
        context = Context(self.model, x.detach(), output.detach(), resolved, None, self.forward)
        key = "deleted" if self.game == "delete" else "explanation"
        return self.finish(maps, maps, context, scores, extras={key: x.detach() * normalize(maps)})


@contextlib.contextmanager
def registered_input_method() -> Iterator[type[Method]]:
    """Register :class:`InputGradient` for the ``with`` block only."""
    METHODS[InputGradient.name] = InputGradient
    try:
        yield InputGradient
    finally:
        METHODS.pop(InputGradient.name, None)


@contextlib.contextmanager
def on_sys_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path``; modules imported from it are forgotten afterwards."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            if str(folder) in str(getattr(module, "__file__", "") or ""):
                del sys.modules[name]
