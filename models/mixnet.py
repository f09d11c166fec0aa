"""MixNet (Tan & Le 2019), scaled down for CI — the zoo's *Concat of Convs → BN* family.

MixNet's ``MixedConv2d`` splits the channels into groups, runs one Conv per group (depthwise with kernels
3/5/7, or grouped 1×1 pointwise convs), concatenates the results and normalises the concatenation with one
``BatchNorm2d``. Exported, that is ``Split → Conv, Conv, … → Concat → BatchNormalization``: the BN's
producer is a Concat, but each of its input channel ranges comes from one Conv read only by the Concat, so
the BN splits per range and folds into each Conv. The network here:

- stem ``Conv 3×3 (stride 2) → BN → ReLU``;
- two inverted-residual blocks (timm's ``InvertedResidual`` with mixed convs): pointwise expansion (the first
  split into two 1×1 convs), mixed depthwise (3/5/7, then 3/5), squeeze-excitation with Swish in the second,
  pointwise projection (split into two 1×1 convs in the second), each followed by a BN; the second has a
  residual connection;
- head ``Conv 1×1 → BN → ReLU``, global average pool, Linear.
"""

from __future__ import annotations

import torch
from torch import nn


def split_channels(channels: int, groups: int) -> list[int]:
    """``channels`` split into ``groups`` near-equal parts, the first taking the remainder (as timm does)."""
    parts = [channels // groups] * groups
    parts[0] += channels - sum(parts)
    return parts


class MixedConv(nn.Module):
    """One Conv per channel group (kernel ``kernels[i]`` for group ``i``), outputs concatenated.

    ``depthwise`` makes each group's Conv depthwise (``groups`` = its channels); otherwise each is a dense Conv
    from its input group to its output group.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernels: tuple[int, ...],
        stride: int = 1,
        depthwise: bool = False,
    ):
        super().__init__()
        self.in_splits = split_channels(in_channels, len(kernels))
        out_splits = self.in_splits if depthwise else split_channels(out_channels, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=cin if depthwise else 1, bias=False)
            for cin, cout, kernel in zip(self.in_splits, out_splits, kernels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.convs) == 1:
            return self.convs[0](x)
        parts = torch.split(x, self.in_splits, dim=1)
        return torch.cat([conv(part) for conv, part in zip(self.convs, parts, strict=True)], dim=1)


class SqueezeExcite(nn.Module):
    """``x · sigmoid(Conv1×1(Swish(Conv1×1(mean(x)))))`` with biased convs and no BN."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class MixBlock(nn.Module):
    """Inverted residual: mixed pointwise expansion → BN → act → mixed depthwise → BN → act → [SE] →
    mixed pointwise projection → BN (+ input when shapes allow)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expansion: int,
        dw_kernels: tuple[int, ...],
        stride: int,
        expand_groups: int = 1,
        project_groups: int = 1,
        squeeze_excite: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = MixedConv(in_channels, hidden, (1,) * expand_groups)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = MixedConv(hidden, hidden, dw_kernels, stride, depthwise=True)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = activation()
        self.se = SqueezeExcite(hidden, max(1, in_channels // 4)) if squeeze_excite else nn.Identity()
        self.project = MixedConv(hidden, out_channels, (1,) * project_groups)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.expand(x)))
        y = self.se(self.act(self.bn2(self.depthwise(y))))
        y = self.bn3(self.project(y))
        return x + y if self.residual else y


class MixNet(nn.Module):
    """Stem, two mixed-kernel inverted residual blocks, 1×1 head conv, pool, classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(
            MixBlock(16, 24, 3, (3, 5, 7), stride=2, expand_groups=2),
            MixBlock(24, 24, 3, (3, 5), stride=1, project_groups=2, squeeze_excite=True, activation=nn.SiLU),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def mixnet() -> MixNet:
    """MixNet-style network: 8 BNs, 4 of them after a Concat of Convs (2 mixed depthwise, 2 split 1×1)."""
    return MixNet()
