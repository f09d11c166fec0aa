"""The one test oracle: original vs folded model on onnxruntime CPU, judged by the library's tolerance table.

Both models run on onnxruntime's CPU provider with every graph optimisation off (``ORT_DISABLE_ALL``, so
onnxruntime does not fold Conv+BN itself). When the CPU provider has no kernel for the dtype (bf16 everywhere,
fp16 Gemm, fp64 Conv), both models are widened to float64 — exactly: every bf16/fp16/fp32 value is a float64 —
and compared there (onnx's reference evaluator where float64 has no kernel either), so the check still sees
the error of the folded weights rounded to the narrow dtype.

An element passes when ``|folded - original| <= atol + rtol·|original|`` with ``atol``/``rtol`` from
:data:`bnfold.validate.tolerances.DEFAULT_TOLERANCES` for the dtype of the model's weights — the same table and
rule ``bnfold verify`` uses, so a test and the CLI cannot disagree on what "equivalent" means. A failure names
the smallest ``rtol`` (at the table's ``atol``) that would have passed.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from bnfold.validate.tolerances import DEFAULT_TOLERANCES, Tolerance

_NARROW_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def tolerance(dtype) -> Tolerance:
    """The library's tolerance for outputs computed from weights of ``dtype`` (numpy or ml_dtypes type)."""
    return DEFAULT_TOLERANCES[np.dtype(dtype).name]


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """A CPU session with every graph optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


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


def random_feeds(
    model: onnx.ModelProto, seed: int = 1, overrides: dict | None = None, free_dim: int = 2
) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs (``True`` for bool ones), then ``overrides``; a dimension without a value
    gets ``free_dim``."""
    rng = np.random.default_rng(seed)
    initializer_names = {init.name for init in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value or free_dim for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = np.array(True) if dtype == np.bool_ else rng.standard_normal(shape).astype(dtype)
    feeds.update(overrides or {})
    return feeds


def assert_close(want: np.ndarray, got: np.ndarray, dtype, what: str = "output") -> None:
    """``got`` matches ``want`` under the library's rule and table for ``dtype``; NaN/Inf at the same places."""
    assert want.shape == got.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    want64, got64 = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
    finite = np.isfinite(want64)
    assert np.array_equal(finite, np.isfinite(got64)), f"{what}: NaN/Inf at other places than the original"
    assert np.array_equal(want64[~finite], got64[~finite], equal_nan=True), f"{what}: different NaN/Inf values"
    bound = tolerance(dtype)
    error = np.abs(got64[finite] - want64[finite])
    allowed = bound.atol + bound.rtol * np.abs(want64[finite])
    if error.size and not np.all(error <= allowed):
        magnitude = np.maximum(np.abs(want64[finite]), np.finfo(np.float64).tiny)
        needed = float(np.max((error - bound.atol) / magnitude))
        raise AssertionError(
            f"{what}: max error {float(error.max()):.3g} (max relative error {float(np.max(error / magnitude)):.3g}) "
            f"beyond atol {bound.atol:g} + rtol {bound.rtol:g}·|r| for {np.dtype(dtype).name}; "
            f"rtol {needed:.3g} would have passed"
        )


def assert_equivalent(
    original: onnx.ModelProto, folded: onnx.ModelProto, dtype=np.float32, feeds: dict | None = None
) -> None:
    """Every output of ``folded`` matches ``original`` (same dtype, same shape, within the table)."""
    feeds = feeds if feeds is not None else random_feeds(original)
    expected = run(original, feeds)
    actual = run(folded, feeds)
    assert len(expected) == len(actual)
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert want.dtype == got.dtype, f"output {index}: dtype {got.dtype}, expected {want.dtype}"
        assert_close(want, got, dtype, f"output {index}")


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
