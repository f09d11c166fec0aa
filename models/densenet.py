"""DenseNet-BC (Huang et al. 2017), scaled down for CI — the zoo's *pre-activation* family.

Each dense layer is ``BN → ReLU → Conv1×1 → BN → ReLU → Conv3×3`` applied to the concatenation of all earlier
feature maps. The first BN of a layer reads a ``Concat`` (or a pooling / the stem's pool), not a conv, so
it cannot be folded into a preceding producer: a folder must leave it with a reason. The second BN follows
a 1×1 Conv and is foldable. Transitions are ``BN → ReLU → Conv1×1 → AvgPool``; the final BN reads a Concat.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """Pre-activation bottleneck producing ``growth`` new channels, concatenated to its input."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4):
        super().__init__()
        width = bottleneck * growth
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        y = self.conv2(torch.relu(self.norm2(y)))
        return torch.cat([x, y], dim=1)


class Transition(nn.Module):
    """``BN → ReLU → Conv1×1 (halve channels) → AvgPool 2×2``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(self.conv(torch.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    """Stem Conv → BN → ReLU → MaxPool, dense blocks with transitions, final BN → ReLU, pool, classifier."""

    def __init__(
        self,
        growth: int = 8,
        layers_per_block: tuple[int, ...] = (3, 3),
        stem_channels: int = 16,
        num_classes: int = 10,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        stages: list[nn.Module] = []
        channels = stem_channels
        for index, count in enumerate(layers_per_block):
            for _ in range(count):
                stages.append(DenseLayer(channels, growth))
                channels += growth
            if index < len(layers_per_block) - 1:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.final_norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.final_norm(self.features(self.stem(x))))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def densenet() -> DenseNet:
    """DenseNet-BC with growth 8, two dense blocks of three layers: 15 BNs, 7 of them after a Conv (foldable)."""
    return DenseNet()
