"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 (Howard et al. 2019), scaled down for CI.

Both are built from inverted residuals: 1×1 expand Conv → BN → act, 3×3 depthwise Conv (``groups =
channels``) → BN → act, 1×1 project Conv → BN (linear bottleneck). V2 uses ReLU6; V3 uses hardswish in later
blocks and a squeeze-and-excitation (SE) gate whose 1×1 convs have biases and no BN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] | None = nn.ReLU6,
) -> nn.Sequential:
    """``Conv(no bias) → BN → activation`` (no activation when ``activation`` is None)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(conv2(relu(conv1(avgpool(x)))))`` — convs with bias, no BN (nothing to fold)."""

    def __init__(self, channels: int, squeezed: int, gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(torch.relu(self.reduce(scale))))


@dataclass(frozen=True)
class InvertedResidualConfig:
    """One inverted-residual block: expansion width, output channels, depthwise kernel and stride, SE and its
    gate, activation."""

    expanded: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    squeeze_excite: bool = False
    activation: type[nn.Module] = nn.ReLU6
    gate: type[nn.Module] = nn.Hardsigmoid


class InvertedResidual(nn.Module):
    """Expand → depthwise → (SE) → project, with an identity residual when shapes allow."""

    def __init__(self, in_channels: int, config: InvertedResidualConfig):
        super().__init__()
        act = config.activation
        layers: list[nn.Module] = []
        if config.expanded != in_channels:
            layers.append(conv_bn_act(in_channels, config.expanded, 1, activation=act))
        layers.append(
            conv_bn_act(
                config.expanded,
                config.expanded,
                config.kernel,
                stride=config.stride,
                groups=config.expanded,
                activation=act,
            )
        )
        if config.squeeze_excite:
            layers.append(SqueezeExcitation(config.expanded, max(8, config.expanded // 4), config.gate))
        layers.append(conv_bn_act(config.expanded, config.out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.residual = config.stride == 1 and in_channels == config.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """Stem Conv → BN → act, a stack of inverted residuals, a 1×1 head Conv → BN → act, pool, classifier."""

    def __init__(
        self,
        configs: Sequence[InvertedResidualConfig],
        *,
        stem_channels: int,
        head_channels: int,
        activation: type[nn.Module],
        num_classes: int = 10,
    ):
        super().__init__()
        self.stem = conv_bn_act(3, stem_channels, 3, stride=2, activation=activation)
        blocks: list[nn.Module] = []
        in_channels = stem_channels
        for config in configs:
            blocks.append(InvertedResidual(in_channels, config))
            in_channels = config.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(in_channels, head_channels, 1, activation=activation)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def mobilenet_v2() -> MobileNet:
    """MobileNetV2 in miniature: expansion 6 inverted residuals with ReLU6, 7 blocks."""
    c = InvertedResidualConfig
    configs = [
        c(16, 8),
        c(48, 12, stride=2),
        c(72, 12),
        c(72, 16, stride=2),
        c(96, 16),
        c(96, 24, stride=2),
        c(144, 32),
    ]
    return MobileNet(configs, stem_channels=16, head_channels=64, activation=nn.ReLU6)


def mobilenet_v3() -> MobileNet:
    """MobileNetV3-Small in miniature: 5×5 depthwise kernels, SE gates, hardswish in the later blocks."""
    c = InvertedResidualConfig
    hs = nn.Hardswish
    configs = [
        c(16, 16, stride=2, squeeze_excite=True, activation=nn.ReLU),
        c(48, 16, stride=2, activation=nn.ReLU),
        c(64, 24, kernel=5, stride=2, squeeze_excite=True, activation=hs),
        c(96, 24, kernel=5, squeeze_excite=True, activation=hs),
        c(96, 32, kernel=5, squeeze_excite=True, activation=hs),
    ]
    return MobileNet(configs, stem_channels=16, head_channels=96, activation=hs)
