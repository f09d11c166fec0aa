"""ShuffleNetV2 (Ma et al. 2018), scaled down for CI.

A unit splits the channels in two (stride 1) or feeds both branches (stride 2); the active branch is
``Conv1×1 → BN → ReLU → depthwise Conv3×3 → BN → Conv1×1 → BN → ReLU``; the halves are concatenated and
channel-shuffled (``Reshape → Transpose → Reshape``). Every BN follows a Conv and is foldable.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """``Conv(no bias) → BN (→ ReLU)``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``[N, g, C/g, H, W] → transpose → [N, C, H, W]``."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit; stride 2 doubles the channels and halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        half = out_channels // 2
        branch_in = in_channels if stride == 2 else half
        self.shortcut = (
            nn.Sequential(
                conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels, relu=False),
                conv_bn(in_channels, half, 1),
            )
            if stride == 2
            else None
        )
        self.branch = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, stride=stride, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            kept, active = x.chunk(2, dim=1)
            y = torch.cat([kept, self.branch(active)], dim=1)
        else:
            y = torch.cat([self.shortcut(x), self.branch(x)], dim=1)
        return channel_shuffle(y, 2)


class ShuffleNetV2(nn.Module):
    """Stem Conv → BN → ReLU → MaxPool, stages of shuffle units, 1×1 head Conv → BN → ReLU, classifier."""

    def __init__(
        self,
        widths: tuple[int, ...] = (24, 48),
        units: tuple[int, ...] = (2, 2),
        stem_channels: int = 16,
        head_channels: int = 64,
        num_classes: int = 10,
    ):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_channels, 3, stride=2), nn.MaxPool2d(3, 2, 1))
        stages: list[nn.Module] = []
        channels = stem_channels
        for width, count in zip(widths, units, strict=True):
            for index in range(count):
                stages.append(ShuffleUnit(channels, width, 2 if index == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(channels, head_channels, 1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def shufflenet_v2() -> ShuffleNetV2:
    """ShuffleNetV2 with two stages of two units (widths 24, 48)."""
    return ShuffleNetV2()
