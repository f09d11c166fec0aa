"""Shared builders for the rule tests (``tests/rules``); the oracle is :mod:`tests.oracle`.

Models are built as ``onnx.ModelProto`` with ``onnx.helper`` so that every test states its graph explicitly.
:func:`assert_equivalent` runs the original and the folded model on onnxruntime CPU with every graph
optimisation off and judges them by the library's tolerance table (see :mod:`tests.oracle`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

import bnfold
from bnfold.report import BatchNormRecord, FoldReport, FoldStatus
from tests.oracle import assert_equivalent, random_feeds, run, session, widen_to_float64

__all__ = ["assert_equivalent", "random_feeds", "run", "session", "widen_to_float64"]  # (re-exported oracle)

FLOAT_DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "fp64", "bf16"]
OPSET = 17


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def bn_arrays(channels: int, dtype, prefix: str = "bn", seed: int = 0) -> dict[str, np.ndarray]:
    """gamma, beta, mean, var for ``channels`` channels (var > 0, gamma around 1)."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}_gamma": rng.uniform(0.5, 1.5, channels).astype(dtype),
        f"{prefix}_beta": rng.standard_normal(channels).astype(dtype),
        f"{prefix}_mean": rng.standard_normal(channels).astype(dtype),
        f"{prefix}_var": rng.uniform(0.2, 2.0, channels).astype(dtype),
    }


def bn_node(x: str, y: str, prefix: str = "bn", **attributes) -> onnx.NodeProto:
    params = [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *params], [y], name=prefix, **attributes)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    arrays: dict[str, np.ndarray] | None = None,
    *,
    value_info: list[onnx.ValueInfoProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
    opset: int = OPSET,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    initializers = [tensor(name, array) for name, array in (arrays or {}).items()]
    graph = helper.make_graph(nodes, "model", inputs, outputs, initializers, value_info=value_info or [])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = 8 if opset <= 16 else 9
    onnx.checker.check_model(model, full_check=True)
    return model


def layer_bn_model(
    op_type: str,
    weight_shape: tuple[int, ...],
    *,
    name: str,
    in_channels: int,
    out_channels: int,
    size: int,
    group: int = 1,
    bias: bool = True,
    dtype=np.float32,
    weight: np.ndarray | None = None,
    bias_values: np.ndarray | None = None,
    bn_channels: int | None = None,
    runtime: tuple[str, ...] = (),
    attributes: dict | None = None,
    check: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """``X → op_type(W[, B]) → BN → Y`` for a Conv-like layer (node ``name``, output ``<name>_out``).

    ``X`` is ``[2, in_channels, size, ...]`` with as many spatial axes as ``weight_shape`` has kernel axes.
    Names in ``runtime`` (``"W"``, ``"B"``) become graph inputs instead of initializers. ``check=False`` builds a
    model the ONNX checker would refuse (to test bnfold on bad input).
    """
    rng = np.random.default_rng(seed)
    if weight is None:
        weight = (rng.standard_normal(weight_shape) * 0.5).astype(dtype)
    rank = weight.ndim - 2
    arrays = {"W": weight, **bn_arrays(bn_channels or out_channels, dtype, seed=seed)}
    node_inputs = ["X", "W"]
    if bias:
        arrays["B"] = rng.standard_normal(out_channels).astype(dtype) if bias_values is None else bias_values
        node_inputs.append("B")
    graph_inputs = [io("X", dtype, [2, in_channels, *(size,) * rank])]
    for name in runtime:
        array = arrays.pop(name)
        graph_inputs.append(io(name, array.dtype, list(array.shape)))
    node = helper.make_node(op_type, node_inputs, [f"{name}_out"], name=name, group=group, **(attributes or {}))
    nodes = [node, bn_node(f"{name}_out", "Y")]
    outputs = [io("Y", dtype, [None] * (rank + 2))]
    if check:
        return make_model(nodes, graph_inputs, outputs, arrays)
    graph = helper.make_graph(nodes, "model", graph_inputs, outputs, [tensor(k, v) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def io(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type(dtype), shape)


def fold_proto(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold through the public API and return a checked proto plus the report."""
    folded, report = bnfold.fold(model, **options)
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    return proto, report


def op_types(graph: onnx.GraphProto | onnx.ModelProto | onnx.FunctionProto) -> list[str]:
    nodes = graph.graph.node if isinstance(graph, onnx.ModelProto) else graph.node
    return [node.op_type for node in nodes]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def assert_same_graph(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """A skipped fold leaves every node and every constant as it was."""
    assert op_types(folded) == op_types(original)
    before, after = initializers(original), initializers(folded)
    assert before.keys() == after.keys()
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array)


def only_record(report: FoldReport) -> BatchNormRecord:
    assert len(report.records) == 1, report.records
    return report.records[0]


def assert_folded(record: BatchNormRecord, rule: str) -> None:
    expected = FoldStatus.LOWERED if rule == "lower_standalone" else FoldStatus.FOLDED
    assert record.status is expected, record
    assert record.reason is None
    assert record.rule == rule


def assert_skipped(record: BatchNormRecord, reason: bnfold.SkipReason) -> None:
    assert record.status is FoldStatus.SKIPPED, record
    assert record.reason is reason, record
