"""EfficientNet-B0-style network (Tan & Le 2019), scaled down for CI.

MBConv blocks: 1×1 expand Conv → BN → SiLU, k×k depthwise Conv → BN → SiLU, squeeze-and-excitation with a
sigmoid gate (biased convs, no BN), 1×1 project Conv → BN, identity residual where shapes allow.
"""

from __future__ import annotations

from torch import nn

from models.mobilenet import InvertedResidualConfig, MobileNet


def efficientnet_b0() -> MobileNet:
    """EfficientNet-B0's stage pattern (kernels 3/5, expansion 1 then 6, SE everywhere) at 1/8 width."""
    silu = nn.SiLU

    def mbconv(expanded: int, out_channels: int, kernel: int = 3, stride: int = 1) -> InvertedResidualConfig:
        return InvertedResidualConfig(
            expanded, out_channels, kernel, stride, squeeze_excite=True, activation=silu, gate=nn.Sigmoid
        )

    configs = [
        mbconv(8, 8),
        mbconv(48, 12, stride=2),
        mbconv(72, 12),
        mbconv(72, 16, kernel=5, stride=2),
        mbconv(96, 24, stride=2),
        mbconv(144, 32, kernel=5),
    ]
    return MobileNet(configs, stem_channels=8, head_channels=96, activation=silu)
