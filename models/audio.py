"""A 1-D audio CNN (keyword-spotting style) over log-mel features — the zoo's Conv1d + BatchNorm1d family.

Input ``[N, 40 mel bins, 98 frames]``. Blocks of ``Conv1d → BatchNorm1d → ReLU``, including a dilated conv and
a depthwise-separable pair (depthwise Conv1d → BN, pointwise Conv1d → BN), then temporal mean pooling and a
linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn


def conv1d_bn(
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """``Conv1d(no bias, 'same'-style padding) → BatchNorm1d (→ ReLU)``."""
    layers: list[nn.Module] = [
        nn.Conv1d(in_channels, out_channels, kernel, stride, dilation * (kernel // 2), dilation, groups, bias=False),
        nn.BatchNorm1d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AudioCNN(nn.Module):
    """Five Conv1d → BN blocks (one dilated, one depthwise-separable), mean over time, classifier."""

    def __init__(self, mel_bins: int = 40, width: int = 32, num_classes: int = 12):
        super().__init__()
        self.features = nn.Sequential(
            conv1d_bn(mel_bins, width, 5, stride=2),
            conv1d_bn(width, width, 3, dilation=2),
            conv1d_bn(width, width, 3, groups=width, relu=False),
            conv1d_bn(width, 2 * width, 1),
            conv1d_bn(2 * width, 2 * width, 3, stride=2),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=2))


def audio_cnn() -> AudioCNN:
    """The 1-D audio CNN: 5 BatchNorm1d after Conv1d (ranks 1), one depthwise."""
    return AudioCNN()
