"""ConvMixer (Trockman & Kolter 2022), scaled down for CI — the zoo's *Conv → GELU → BN* family.

ConvMixer puts every BN *after* the activation: a patch embedding ``Conv(k=p, stride=p) → GELU → BN``, then
``depth`` mixer blocks ``Residual(depthwise Conv (padding "same") → GELU → BN) → Conv1×1 → GELU → BN``, and the
head ``AdaptiveAvgPool2d(1) → Flatten → Linear``.

A BN after GELU has no producer to fold into, so only a forward fold can remove it:

- the last block's BN feeds the head: a per-channel affine commutes with spatial averaging, so it folds
  forward through the pooling and ``Flatten`` into the classifier's ``Gemm``;
- every other BN cannot fold anywhere: the patch embedding's and each block's last BN feed both the next
  block's padded depthwise Conv and its residual ``Add``; the depthwise branch's BN feeds the ``Add``.
  These ``2 · depth`` BNs stay (``UNSUPPORTED_PRODUCER``), as they do in every folder.
"""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def mixer_block(dim: int, kernel: int) -> nn.Sequential:
    """``Residual(depthwise Conv → GELU → BN) → Conv1×1 → GELU → BN``."""
    return nn.Sequential(
        Residual(
            nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"), nn.GELU(), nn.BatchNorm2d(dim))
        ),
        nn.Conv2d(dim, dim, 1),
        nn.GELU(),
        nn.BatchNorm2d(dim),
    )


def convmixer(dim: int = 32, depth: int = 2, kernel: int = 5, patch: int = 4, num_classes: int = 10) -> nn.Sequential:
    """ConvMixer-32/2 on 32×32 inputs (8×8 patches): 5 BNs — 4 unfoldable, the last folds into the head."""
    return nn.Sequential(
        nn.Conv2d(3, dim, patch, stride=patch),
        nn.GELU(),
        nn.BatchNorm2d(dim),
        *(mixer_block(dim, kernel) for _ in range(depth)),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, num_classes),
    )
