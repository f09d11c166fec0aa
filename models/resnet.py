"""ResNet (basic and bottleneck blocks) and ResNeXt (grouped bottleneck), scaled down for CI.

Every convolution is followed by a BatchNorm (the classic Conv → BN → ReLU pattern, He et al. 2016); the
projection shortcut is a 1×1 Conv → BN. ResNeXt (Xie et al. 2017) replaces the bottleneck's 3×3 conv with a
grouped one (``cardinality`` groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``Conv(k×k, no bias) → BN``, the standard pairing that a folder turns into one Conv with bias."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3×3 Conv → BN with a residual: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        self.branch1 = conv_bn(in_channels, channels, 3, stride=stride)
        self.branch2 = conv_bn(channels, channels, 3)
        self.shortcut = (
            conv_bn(in_channels, channels, 1, stride=stride)
            if stride != 1 or in_channels != channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.branch1(x))
        return torch.relu(self.branch2(y) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (optionally grouped, ResNeXt) → 1×1 expand, each Conv → BN, with a residual."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(channels * base_width / 64) * groups
        out_channels = channels * self.expansion
        self.reduce = conv_bn(in_channels, width, 1)
        self.spatial = conv_bn(width, width, 3, stride=stride, groups=groups)
        self.expand = conv_bn(width, out_channels, 1)
        self.shortcut = (
            conv_bn(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.reduce(x))
        y = torch.relu(self.spatial(y))
        return torch.relu(self.expand(y) + self.shortcut(x))


class ResNet(nn.Module):
    """A 3×3 stem, one stage per entry of ``widths`` (the first at stride 1, later ones at stride 2), global
    average pooling and a linear classifier."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        *,
        stem_channels: int = 16,
        num_classes: int = 10,
        groups: int = 1,
        base_width: int = 64,
    ):
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3)
        stages: list[nn.Module] = []
        in_channels = stem_channels
        for index, (width, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            layers: list[nn.Module] = []
            for block_index in range(count):
                stride = 2 if index > 0 and block_index == 0 else 1
                layers.append(block(in_channels, width, stride, groups, base_width))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(torch.relu(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def resnet_basic() -> ResNet:
    """ResNet-10-like: basic blocks, widths 16/32/64, one block per stage."""
    return ResNet(BasicBlock, (16, 32, 64), (1, 1, 1))


def resnet_bottleneck() -> ResNet:
    """ResNet-50-like in miniature: bottleneck blocks (expansion 4), widths 8/16/32."""
    return ResNet(Bottleneck, (8, 16, 32), (1, 2, 1))


def resnext() -> ResNet:
    """ResNeXt-like: bottlenecks whose 3×3 conv has 4 groups (cardinality 4, base width 8)."""
    return ResNet(Bottleneck, (8, 16, 32), (1, 1, 1), groups=4, base_width=8)


def demo_resnet() -> ResNet:
    """The README's demo: basic blocks, widths 16/24/32, 9 BatchNorms, about 120 KB of fp32 weights."""
    return ResNet(BasicBlock, (16, 24, 32), (1, 1, 1))
