"""Torch exports for the forward-fold tests: plain torch modules, exported both ways, folded and compared.

``torchscript`` is ``torch.onnx.export(..., dynamo=False, training=PRESERVE)`` (BN kept as a node, eval-mode
Dropout dropped); ``dynamo`` is ``torch.onnx.export(..., dynamo=True, optimize=False)`` (the raw program: BN
kept, shapes and reshape targets computed by small constant subgraphs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from rules_helpers import assert_equivalent, fold_proto, op_types, run

EXPORTERS = ["torchscript", "dynamo"]


def randomise_batch_norms(net) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are the identity)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)


def export(net, example, exporter: str, dynamic_batch: bool = False) -> onnx.ModelProto:
    """``net`` exported with its input's dimension 0 fixed, or named ``N`` when ``dynamic_batch``."""
    import torch

    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dynamic = ({0: torch.export.Dim("N")},) if dynamic_batch else None
            program = torch.onnx.export(net, (example,), dynamo=True, optimize=False, dynamic_shapes=dynamic)
            return program.model_proto
        buffer = io.BytesIO()
        axes = {"x": {0: "N"}} if dynamic_batch else None
        preserve = torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(
            net, (example,), buffer, dynamo=False, training=preserve, input_names=["x"], dynamic_axes=axes
        )
        return onnx.load_from_string(buffer.getvalue())


def fold_torch(
    net, example, exporter: str, expected: list[tuple[str, bool]], dynamic_batch: bool = False
) -> onnx.ModelProto:
    """Export ``net``, fold it, and check the ``(rule, folded)`` records, the BN count and the numerics.

    The folded model is compared with the exported one (onnxruntime, optimisations off) and with torch itself.
    """
    import torch

    randomise_batch_norms(net)
    original = export(net, example, exporter, dynamic_batch)
    assert op_types(original).count("BatchNormalization") == len(expected)
    folded, report = fold_proto(original)
    assert [(record.rule, record.folded) for record in report.records] == expected, report.records
    assert op_types(folded).count("BatchNormalization") == sum(not done for _, done in expected)
    feeds = {original.graph.input[0].name: example.numpy()}
    assert_equivalent(original, folded, np.float32, feeds)
    with torch.no_grad():
        want = net(example).numpy()
    np.testing.assert_allclose(run(folded, feeds)[0], want, rtol=1e-4, atol=1e-4)
    return folded


def torch_or_skip():
    return pytest.importorskip("torch")
