"""U-Net (Ronneberger et al. 2015), scaled down for CI — the zoo's ConvTranspose + BN family.

Encoder: ``(Conv3×3 with bias → BN → ReLU) ×2`` then MaxPool. Decoder: ``ConvTranspose2×2 stride 2 → BN →
ReLU`` upsampling, concatenation with the skip connection, then ``(Conv → BN → ReLU) ×2``. A 1×1 Conv
produces per-pixel class logits. The convs keep their bias (as many U-Net implementations do), so a folder
must merge BN into an existing bias; one up-sampler is a grouped ConvTranspose.
"""

from __future__ import annotations

import torch
from torch import nn


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """``(Conv3×3 (bias) → BN → ReLU) × 2``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def up_conv(in_channels: int, out_channels: int, groups: int = 1) -> nn.Sequential:
    """``ConvTranspose2×2 stride 2 (no bias) → BN → ReLU``: doubles the resolution."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Three resolutions (32, 16, 8 for a 32×32 input); output ``[N, classes, H, W]``."""

    def __init__(self, in_channels: int = 3, base: int = 8, num_classes: int = 4):
        super().__init__()
        self.encode1 = double_conv(in_channels, base)
        self.encode2 = double_conv(base, 2 * base)
        self.bottom = double_conv(2 * base, 4 * base)
        self.up2 = up_conv(4 * base, 2 * base, groups=2)
        self.decode2 = double_conv(4 * base, 2 * base)
        self.up1 = up_conv(2 * base, base)
        self.decode1 = double_conv(2 * base, base)
        self.logits = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.encode1(x)
        skip2 = self.encode2(nn.functional.max_pool2d(skip1, 2))
        y = self.bottom(nn.functional.max_pool2d(skip2, 2))
        y = self.decode2(torch.cat([self.up2(y), skip2], dim=1))
        y = self.decode1(torch.cat([self.up1(y), skip1], dim=1))
        return self.logits(y)


def unet() -> UNet:
    """U-Net with base width 8: 12 BNs, 2 of them after a ConvTranspose (one grouped)."""
    return UNet()
