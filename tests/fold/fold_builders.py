"""Builders of small Conv/ConvTranspose + BatchNormalization models; the oracle is :mod:`tests.oracle`."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests import oracle
from tests.oracle import run, session

__all__ = ["ConvBN", "assert_equivalent", "op_types", "random_feeds", "run", "session"]

NP_TO_ONNX = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): onnx.TensorProto.BFLOAT16,
}


@dataclasses.dataclass
class ConvBN:
    """A ``(Conv|ConvTranspose) → BatchNormalization`` model description; ``build()`` makes the proto."""

    rank: int = 2
    group: int = 1
    in_channels: int = 4
    out_channels: int = 6
    kernel: int = 3
    bias: bool = True
    transpose: bool = False
    dtype: type = np.float32
    stats_dtype: type | None = None  # opset-15 split: mean/var in another dtype
    opset: int = 17
    ir_version: int | None = None
    conv_attributes: dict = dataclasses.field(default_factory=dict)
    bn_attributes: dict = dataclasses.field(default_factory=dict)
    spatial_size: int = 6
    seed: int = 0

    def weight_shape(self) -> tuple[int, ...]:
        kernel = (self.kernel,) * self.rank
        if self.transpose:
            return (self.in_channels, self.out_channels // self.group, *kernel)
        return (self.out_channels, self.in_channels // self.group, *kernel)

    def input_shape(self) -> tuple[int, ...]:
        return (2, self.in_channels, *(self.spatial_size,) * self.rank)

    def arrays(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        c = self.out_channels
        stats = self.stats_dtype or self.dtype
        arrays = {
            "W": (rng.standard_normal(self.weight_shape()) * 0.5).astype(self.dtype),
            "gamma": rng.uniform(0.5, 1.5, c).astype(self.dtype),
            "beta": rng.standard_normal(c).astype(self.dtype),
            "mean": rng.standard_normal(c).astype(stats),
            "var": rng.uniform(0.2, 2.0, c).astype(stats),
        }
        if self.bias:
            arrays["B"] = rng.standard_normal(c).astype(self.dtype)
        return arrays

    def nodes(self) -> list[onnx.NodeProto]:
        op = "ConvTranspose" if self.transpose else "Conv"
        inputs = ["X", "W", "B"] if self.bias else ["X", "W"]
        attributes = {"group": self.group, **self.conv_attributes}
        return [
            helper.make_node(op, inputs, ["conv_out"], name="conv", **attributes),
            helper.make_node(
                "BatchNormalization",
                ["conv_out", "gamma", "beta", "mean", "var"],
                ["Y"],
                name="bn",
                **self.bn_attributes,
            ),
        ]

    def build(self) -> onnx.ModelProto:
        elem = NP_TO_ONNX[np.dtype(self.dtype)]
        initializers = [numpy_helper.from_array(array, name) for name, array in self.arrays().items()]
        graph = helper.make_graph(
            self.nodes(),
            "conv_bn",
            [helper.make_tensor_value_info("X", elem, list(self.input_shape()))],
            [helper.make_tensor_value_info("Y", elem, [None] * (self.rank + 2))],
            initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version or min(onnx.IR_VERSION, 8 if self.opset <= 16 else 9)
        return model


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    return oracle.random_feeds(model, seed, free_dim=1)


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, dtype=np.float32) -> None:
    """Original vs folded on onnxruntime CPU (optimisations off), judged by the library's tolerance table."""
    oracle.assert_equivalent(original, folded, dtype, random_feeds(original))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]
