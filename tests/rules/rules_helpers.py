"""Shared builders and the onnxruntime oracle for the rule tests (``tests/rules``).

Models are built as ``onnx.ModelProto`` with ``onnx.helper`` so that every test states its graph explicitly.
The oracle runs the original and the folded model on onnxruntime CPU with every graph optimisation off
(``ORT_DISABLE_ALL``). When the CPU provider has no kernel for the dtype (bf16 everywhere, fp64 Conv), both
models are widened to float64 — exactly, every bf16/fp16 value is a float64 — and compared there, so the
check still sees the error of the folded weights rounded to the narrow dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

import bnfold
from bnfold.report import BatchNormRecord, FoldReport, FoldStatus

FLOAT_DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "fp64", "bf16"]
OPSET = 17

# Largest error relative to max(1, max|reference|) that a folded model may show, per dtype of the weights.
RELATIVE_TOLERANCE = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float16): 2e-2,
    np.dtype(ml_dtypes.bfloat16): 6e-2,
}

_NARROW_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


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


def random_feeds(model: onnx.ModelProto, seed: int = 1, overrides: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializer_names = {init.name for init in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value or 2 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = np.array(True)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    feeds.update(overrides or {})
    return feeds


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime CPU, optimisations off; the float64-widened model when CPU lacks a kernel for the dtype."""
    try:
        return session(model).run(None, feeds)
    except (ort_errors.NotImplemented, ort_errors.InvalidGraph, ort_errors.Fail):
        wide = widen_to_float64(model)
        wide_feeds = {k: v.astype(np.float64) if _is_narrow_float(v) else v for k, v in feeds.items()}
        try:
            return session(wide).run(None, wide_feeds)
        except ort_errors.NotImplemented:  # fp64 Conv has no CPU kernel: onnx's numpy reference evaluator
            return ReferenceEvaluator(wide).run(None, wide_feeds)


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, dtype, feeds=None) -> None:
    """Every output of ``folded`` matches ``original`` within the dtype's relative tolerance."""
    feeds = feeds if feeds is not None else random_feeds(original)
    expected = run(original, feeds)
    actual = run(folded, feeds)
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert want.shape == got.shape
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(want64))))
        error = float(np.max(np.abs(want64 - got64))) / scale
        assert error <= RELATIVE_TOLERANCE[np.dtype(dtype)], f"relative error {error:.3g} for {np.dtype(dtype)}"


def _is_narrow_float(array: np.ndarray) -> bool:
    return array.dtype in (np.float32, np.float16, ml_dtypes.bfloat16)


def widen_to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every fp32/fp16/bf16 tensor, type and Constant widened to float64 (exact)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    _widen_graph(wide.graph)
    for function in wide.functions:
        for node in function.node:
            _widen_node(node)
    return wide


def _widen_tensor(tensor_proto: onnx.TensorProto) -> None:
    if tensor_proto.data_type in _NARROW_FLOATS:
        array = numpy_helper.to_array(tensor_proto).astype(np.float64)
        tensor_proto.CopyFrom(numpy_helper.from_array(array, tensor_proto.name))


def _widen_type(type_proto: onnx.TypeProto) -> None:
    if type_proto.HasField("tensor_type") and type_proto.tensor_type.elem_type in _NARROW_FLOATS:
        type_proto.tensor_type.elem_type = onnx.TensorProto.DOUBLE


def _widen_node(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            _widen_tensor(attribute.t)
        if attribute.HasField("g"):
            _widen_graph(attribute.g)
        for subgraph in attribute.graphs:
            _widen_graph(subgraph)


def _widen_graph(graph: onnx.GraphProto) -> None:
    for initializer in graph.initializer:
        _widen_tensor(initializer)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _widen_type(value.type)
    for node in graph.node:
        _widen_node(node)
