"""LeViT (Graham et al. 2021), scaled down for CI — the zoo's *Linear+BN on tokens* family.

LeViT normalises every token projection with ``LinearNorm`` (timm's ``Linear`` + ``BatchNorm1d``): a ``Linear``
without bias on ``[B, N, C]`` tokens, the tokens flattened into the batch for ``BatchNorm1d`` and reshaped back,
``bn(linear(x).flatten(0, 1)).reshape_as(x)``. Exported, that is ``MatMul`` (3-D input, constant weight) →
``Flatten``/``Reshape`` to ``[B·N, C]`` → ``BatchNormalization`` → ``Reshape`` to ``[B, N, C]``: the BN's channel
is the MatMul's output feature (last axis), so it folds into the weight's columns once a folder looks through
the flatten. The network here:

- stem: two strided ``Conv(bias=False) → BatchNorm2d`` (``ConvNorm``) with Hardswish, 32×32 → 8×8, then the
  feature map becomes 64 tokens of width 32;
- ``depth`` × (residual tiny attention: ``LinearNorm`` qkv, 2 heads, softmax, Hardswish, ``LinearNorm``
  projection; residual MLP: ``LinearNorm → Hardswish → LinearNorm``);
- head: mean over tokens, then timm's ``NormLinear``: ``BatchNorm1d → Linear`` (a BN that folds *forward*
  into the classifier's Gemm; its producer is a ReduceMean).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNorm(nn.Sequential):
    """``Conv2d(bias=False) → BatchNorm2d`` (timm's ``ConvNorm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 2):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class LinearNorm(nn.Module):
    """timm's ``LinearNorm``: Linear without bias, BatchNorm1d over the tokens flattened into the batch."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    """Multi-head self-attention whose qkv and output projections are ``LinearNorm`` (no attention bias)."""

    def __init__(self, dim: int, heads: int = 2, key_dim: int = 8, value_dim: int = 16):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * value_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, self.heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attention = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.heads * self.value_dim)
        return self.proj(y)


class Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class LeViT(nn.Module):
    """ConvNorm stem → tokens → ``depth`` × (attention, MLP) → mean over tokens → BatchNorm1d → Linear."""

    def __init__(self, dim: int = 32, depth: int = 2, mlp_ratio: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, dim // 2), nn.Hardswish(), ConvNorm(dim // 2, dim))
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(Residual(Attention(dim)))
            hidden = mlp_ratio * dim
            blocks.append(Residual(nn.Sequential(LinearNorm(dim, hidden), nn.Hardswish(), LinearNorm(hidden, dim))))
        self.blocks = nn.Sequential(*blocks)
        self.head_norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        tokens = self.blocks(tokens)
        return self.head(self.head_norm(tokens.mean(1)))


def levit() -> LeViT:
    """LeViT with width 32 and two (attention, MLP) stages: 11 BNs — 2 after a Conv, 8 ``LinearNorm``, 1 head."""
    return LeViT()
