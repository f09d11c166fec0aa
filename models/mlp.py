"""An MLP with ``Linear → BatchNorm1d → ReLU`` hidden layers — the zoo's Gemm/MatMul + BN family.

Input ``[N, 64]`` features. Exported, a 2-D ``Linear`` becomes ``Gemm`` (``transB=1``); the TorchScript
exporter turns the bias-less one into ``MatMul`` with a pre-transposed weight. Each is followed by
``BatchNormalization`` over the feature axis (axis 1); for the bias-less layer a folder must create a bias.
"""

from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10) -> nn.Sequential:
    """``(Linear → BatchNorm1d → ReLU)`` per hidden width (the second Linear without bias), then Linear."""
    layers: list[nn.Module] = []
    features = in_features
    for index, width in enumerate(hidden):
        layers += [nn.Linear(features, width, bias=index != 1), nn.BatchNorm1d(width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
