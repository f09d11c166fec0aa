"""A small 3-D conv net for video clips (C3D / R(2+1)D style) — the zoo's Conv3d + BatchNorm3d family.

Input ``[N, 3 channels, 8 frames, 16, 16]``. ``Conv3d → BatchNorm3d → ReLU`` blocks: a full 3×3×3 conv, a
factorised (2+1)D pair (1×3×3 spatial then 3×1×1 temporal), a strided conv and a grouped 3-D conv, then
global pooling and a classifier.

The convs keep their bias: torch 2.13's dynamo exporter gives a bias-less ``Conv3d`` a computed zero bias of
shape ``[C_out, 2]`` instead of ``[C_out]``, a model onnxruntime refuses to run. With a bias, a folder must
also merge the BN shift into the existing bias.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3d_bn(
    in_channels: int,
    out_channels: int,
    kernel: tuple[int, int, int],
    *,
    stride: tuple[int, int, int] = (1, 1, 1),
    groups: int = 1,
) -> nn.Sequential:
    """``Conv3d(with bias, 'same'-style padding) → BatchNorm3d → ReLU``."""
    padding = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel, stride, padding, groups=groups),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
    )


class VideoCNN(nn.Module):
    """Five Conv3d → BN3d → ReLU blocks, global average pooling, classifier."""

    def __init__(self, width: int = 16, num_classes: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            conv3d_bn(3, width, (3, 3, 3)),
            conv3d_bn(width, width, (1, 3, 3)),
            conv3d_bn(width, width, (3, 1, 1)),
            conv3d_bn(width, 2 * width, (3, 3, 3), stride=(2, 2, 2)),
            conv3d_bn(2 * width, 2 * width, (3, 3, 3), groups=4),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool3d(self.features(x), 1)
        return self.classifier(torch.flatten(y, 1))


def video_cnn() -> VideoCNN:
    """The 3-D conv net: 5 BatchNorm3d after Conv3d (rank 3), one grouped."""
    return VideoCNN()
