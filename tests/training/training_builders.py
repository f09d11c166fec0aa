"""Shared helpers for the training tests: BN models, onnxruntime runs, tolerances, torch references."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as oh

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

BN_OUTPUTS = ("Y", "running_mean", "running_var", "saved_mean", "saved_inv_std")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def onnx_type(dtype: np.dtype) -> int:
    return oh.np_dtype_to_tensor_dtype(np.dtype(dtype))


def bn_model(
    opset: int,
    *,
    outputs: int | Sequence[str] = 1,
    attributes: dict | None = None,
    x_shape: Sequence[int] = (2, 3, 4, 5),
    x_dtype: np.dtype = np.float32,
    scale_dtype: np.dtype | None = None,
    stats_dtype: np.dtype | None = None,
    param_shape: Sequence[int] | None = None,
    x_from_relu: bool = False,
    typed_intermediate: bool = True,
    name: str = "bn",
) -> onnx.ModelProto:
    """A one-BN model (optionally ``Relu`` → BN so that X is an intermediate value).

    ``outputs`` is a count (names from :data:`BN_OUTPUTS`) or explicit names (``""`` for an empty slot).
    """
    scale_dtype = np.dtype(x_dtype if scale_dtype is None else scale_dtype)
    stats_dtype = np.dtype(x_dtype if stats_dtype is None else stats_dtype)
    channels = 1 if len(x_shape) == 1 else x_shape[1]
    param_shape = list(param_shape) if param_shape is not None else [channels]
    output_names = list(BN_OUTPUTS[:outputs]) if isinstance(outputs, int) else list(outputs)
    x_name = "X_relu" if x_from_relu else "X"
    nodes = [oh.make_node("Relu", ["X"], [x_name], name="relu")] if x_from_relu else []
    nodes.append(
        oh.make_node(
            "BatchNormalization", [x_name, "scale", "B", "mean", "var"], output_names, name=name, **(attributes or {})
        )
    )
    dtypes = {"X": x_dtype, "scale": scale_dtype, "B": scale_dtype, "mean": stats_dtype, "var": stats_dtype}
    inputs = [
        oh.make_tensor_value_info(input_name, onnx_type(dtype), list(x_shape) if input_name == "X" else param_shape)
        for input_name, dtype in dtypes.items()
    ]
    graph_outputs = [
        oh.make_tensor_value_info(
            output,
            onnx_type(x_dtype if index == 0 else stats_dtype),
            list(x_shape) if index == 0 else param_shape,
        )
        for index, output in enumerate(output_names)
        if output
    ]
    graph = oh.make_graph(nodes, "bn_graph", inputs, graph_outputs)
    if x_from_relu and typed_intermediate:
        graph.value_info.append(oh.make_tensor_value_info(x_name, onnx_type(x_dtype), list(x_shape)))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def bn_inputs(
    rng: np.random.Generator,
    x_shape: Sequence[int],
    *,
    x_dtype: np.dtype = np.float32,
    scale_dtype: np.dtype | None = None,
    stats_dtype: np.dtype | None = None,
    param_shape: Sequence[int] | None = None,
    offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """Random X, scale, B, mean and positive var, keyed by the :func:`bn_model` input names."""
    scale_dtype = x_dtype if scale_dtype is None else scale_dtype
    stats_dtype = x_dtype if stats_dtype is None else stats_dtype
    channels = 1 if len(x_shape) == 1 else x_shape[1]
    param_shape = tuple(param_shape) if param_shape is not None else (channels,)
    return {
        "X": (offset + 2.0 * rng.standard_normal(x_shape)).astype(x_dtype),
        "scale": rng.uniform(0.5, 2.0, param_shape).astype(scale_dtype),
        "B": rng.standard_normal(param_shape).astype(scale_dtype),
        "mean": rng.standard_normal(param_shape).astype(stats_dtype),
        "var": rng.uniform(0.5, 2.0, param_shape).astype(stats_dtype),
    }


def session(model: onnx.ModelProto, provider: str = CPU) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = CPU) -> list[np.ndarray]:
    return session(model, provider).run(None, feeds)


@functools.cache
def cuda_unusable_reason() -> str | None:
    """``None`` when onnxruntime really runs a model on CUDA, else why not."""
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (CPU-only build or no GPU)"
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "probe",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    try:
        probe = session(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), CUDA)
    except Exception as error:
        return f"CUDAExecutionProvider failed to start: {error}"
    if probe.get_providers()[0] != CUDA:
        return "CUDAExecutionProvider is listed but onnxruntime fell back to the CPU"
    return None


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual − expected| / max |expected|`` in float64 (normwise relative error)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    difference = np.max(np.abs(actual - expected)) if expected.size else 0.0
    return float(difference / scale) if scale > 0 else float(difference)


def assert_relative(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    error = relative_error(actual, expected)
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g}"
