"""A face-recognition network (InsightFace's iResNet output layer), scaled down for CI — the zoo's *BN folded
forward into a Linear* family.

The trunk is a small residual CNN (``Conv → BN → PReLU`` stem, two basic blocks with projection shortcuts and
no activation after the sum, as in iResNet). Its output goes through InsightFace's embedding head::

    BatchNorm2d → Dropout → Flatten → Linear → BatchNorm1d        (the 64-d face embedding)

and then an MLP on the embedding, ``Linear → ReLU → BatchNorm1d → Linear`` (e.g. an attribute classifier).

Two BNs have no producer to fold into: the ``BatchNorm2d`` reads the residual ``Add`` and the MLP's
``BatchNorm1d`` reads a ``Relu``. Both fold *forward* into the following Linear (``Gemm``): for the first, through
``Dropout`` (the identity at inference; the exporters drop it) and ``Flatten`` of ``[N, C, H, W]``, where input
feature ``c·H·W + k`` of the Linear takes channel ``c``'s scale. The embedding's ``BatchNorm1d`` follows the
Linear and folds backwards as usual.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """``Conv3×3 (stride) → BN → PReLU → Conv3×3 → BN`` plus a ``Conv1×1 → BN`` projection; no final activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class FaceNet(nn.Module):
    """Residual trunk → ``BN2d → Dropout → Flatten → Linear → BN1d`` embedding → ``Linear → ReLU → BN1d →
    Linear``."""

    def __init__(self, embedding: int = 64, hidden: int = 32, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            BasicBlock(16, 24, stride=2),
            BasicBlock(24, 32, stride=2),
        )
        channels, side = 32, 4  # for a 3×32×32 input
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(channels * side * side, embedding),
            nn.BatchNorm1d(embedding),
        )
        self.mlp = nn.Sequential(
            nn.Linear(embedding, hidden), nn.ReLU(), nn.BatchNorm1d(hidden), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.output_layer(self.trunk(x)))


def face_head() -> FaceNet:
    """10 BNs: 7 after a Conv, 1 after the embedding Linear, 2 that fold forward into a Linear."""
    return FaceNet()
