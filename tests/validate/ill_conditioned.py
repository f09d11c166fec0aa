"""Ill-conditioned and well-conditioned networks from ``models/`` for the float64-truth tests (issue 15).

The issue's case: real architectures in eval mode with badly scaled BN statistics (``running_var`` uniform in
[0.2, 2.2], ``running_mean`` ±0.5, γ up to 1.75) exported with TorchScript and ``TrainingMode.PRESERVE`` so
every BN stays; logits reach ~1e4 from cancelling terms, so float32 rounding alone exceeds the elementwise
tolerance and a correct fold fails the plain check. Here: ResNet-50's block layout (3, 4, 6, 3 bottlenecks)
and MobileNetV3 from ``models/``, widths scaled down, He (fan-out) initialisation as torchvision/timm use,
1,000 classes (so that some logits sit near zero, where rtol gives no slack).

Bugs are injected into the *folded* model, after bnfold folded it correctly (see :func:`inject`).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper
from torch import nn

import bnfold
from models.common import batchnorm_modules, calibrate_batchnorm, calibration_batch, single_threaded
from models.export import Exporter, export_model
from models.mobilenet import InvertedResidualConfig, MobileNet
from models.resnet import Bottleneck, ResNet, conv_bn

SAMPLE_SHAPE = (3, 16, 16)


def _extreme_statistics(model: nn.Module, seed: int) -> nn.Module:
    """The issue's BN state: var U[0.2, 2.2], mean U[-0.5, 0.5], γ U[0.25, 1.75], β N(0, 0.25)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in batchnorm_modules(model):
            size = norm.num_features
            norm.running_var.copy_(0.2 + 2.0 * torch.rand(size, generator=generator))
            norm.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            norm.weight.copy_(0.25 + 1.5 * torch.rand(size, generator=generator))
            norm.bias.copy_(0.25 * torch.randn(size, generator=generator))
    return model.eval()


def _he_initialised(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def _export(model: nn.Module) -> onnx.ModelProto:
    with single_threaded():
        exported = export_model(
            model,
            (torch.zeros((2, *SAMPLE_SHAPE)),),
            exporter=Exporter.TORCHSCRIPT,
            opset=17,
            input_names=("input",),
            output_names=("output",),
        )
    return ir.to_proto(exported)


@functools.cache
def resnet50_layout() -> onnx.ModelProto:
    """Ill-conditioned: bottlenecks in ResNet-50's (3, 4, 6, 3) layout, widths 8-64, 1,000 classes."""
    torch.manual_seed(15)
    with single_threaded():
        model = _he_initialised(ResNet(Bottleneck, (8, 16, 32, 64), (3, 4, 6, 3), num_classes=1000))
    return _export(_extreme_statistics(model, seed=15))


@functools.cache
def mobilenet_v3_large_head() -> onnx.ModelProto:
    """Ill-conditioned: the zoo's MobileNetV3 blocks with extreme statistics, a wide head, 1,000 classes."""
    c = InvertedResidualConfig
    hs = nn.Hardswish
    configs = [
        c(16, 16, stride=2, squeeze_excite=True, activation=nn.ReLU),
        c(48, 16, stride=2, activation=nn.ReLU),
        c(64, 24, kernel=5, stride=2, squeeze_excite=True, activation=hs),
        c(96, 24, kernel=5, squeeze_excite=True, activation=hs),
        c(96, 32, kernel=5, squeeze_excite=True, activation=hs),
    ]
    torch.manual_seed(16)
    with single_threaded():
        model = _he_initialised(
            MobileNet(configs, stem_channels=16, head_channels=576, activation=hs, num_classes=1000)
        )
    return _export(_extreme_statistics(model, seed=16))


class _Wide(nn.Module):
    """Conv → BN → ReLU (16) → 1×1 Conv → BN → ReLU (2,048 channels) → 1×1 Conv → BN → pool → Linear."""

    def __init__(self, *, classes: int) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.wide = conv_bn(16, 2048, 1)
        self.narrow = conv_bn(2048, 32, 1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.narrow(torch.relu(self.wide(torch.relu(self.stem(x))))))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@functools.cache
def wide_well_conditioned() -> onnx.ModelProto:
    """Well-conditioned, with a 2,048-channel layer: realistic (calibrated) BN state, 10 classes."""
    torch.manual_seed(17)
    with single_threaded():
        model = _Wide(classes=10)
    shape = (8, *SAMPLE_SHAPE)
    model = calibrate_batchnorm(model, lambda generator: (calibration_batch(shape, generator),), seed=17)
    return _export(model)


@functools.cache
def wide_ill_conditioned() -> onnx.ModelProto:
    """Ill-conditioned, with a 2,048-channel layer: He init, extreme statistics, 1,000 classes."""
    torch.manual_seed(18)
    with single_threaded():
        model = _he_initialised(_Wide(classes=1000))
    return _export(_extreme_statistics(model, seed=18))


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], list]:
    """bnfold's fold of ``model``, the probes the fold command passes, and the folded records."""
    folded, report = bnfold.fold(model)
    return ir.to_proto(folded), report.probe_tensors(), list(report.folded)


def _conv_for(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.op_type == "Conv" and node.output[0] == output)


def inject(model: onnx.ModelProto, record, bug: str) -> onnx.ModelProto:
    """A copy of folded ``model`` with one bug in the Conv that absorbed BN ``record``:

    - ``"weight"``: the whole folded weight scaled by 1.01;
    - ``"channel"``: one output channel of the folded weight scaled by 1.01 (the widest channel count here);
    - ``"bias"``: the folded bias off by 1e-3 relative (scaled by 1.001).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    conv = _conv_for(copy, record.output)
    name = conv.input[2] if bug == "bias" else conv.input[1]
    for index, tensor in enumerate(copy.graph.initializer):
        if tensor.name != name:
            continue
        array = numpy_helper.to_array(tensor).astype(np.float64)
        if bug == "channel":
            array[array.shape[0] // 2] *= 1.01
        else:
            array *= 1.01 if bug == "weight" else 1.001
        copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
        return copy
    raise KeyError(name)
