"""The original model evaluated in float64: the truth a verdict falls back on when float32 alone cannot decide.

Why: a fixed elementwise tolerance cannot tell float32 rounding in a badly conditioned network (logits of
1e4 built from cancelling terms) from a wrong fold. Evaluating the *original* model with every floating
tensor widened to float64 gives a reference whose own rounding is ~1e-16 relative, so "how far is each
float32 model from the truth" becomes measurable: a correct fold is about as far as the original (often
closer), a wrong one is far off at the fold it broke.

How the float64 copy is made (:func:`as_float64_model`): every float/float16/bfloat16 initializer,
``Constant``/``ConstantOfShape`` value, graph input/output/value_info type and ``Cast``/``EyeLike``/random-op
target type becomes double, in the main graph and every subgraph. Integer and bool tensors are untouched.
Inputs are the verification's own float32 batches, widened exactly.

Which engine (:class:`Float64Evaluator`): onnxruntime first, on the float64 copy, optimisations off (the
same engine as the float32 check, fast, C++ kernels); onnxruntime 1.32 has double kernels for Gemm, MatMul,
BatchNormalization, Add/Mul/Sub/Div, Relu, Sigmoid, Tanh, Softmax, Clip, MaxPool, ReduceMean, Concat... but
**not** for Conv, ConvTranspose, AveragePool, GlobalAveragePool, HardSigmoid or HardSwish, so every CNN
fails to load there. Then ``onnx.reference.ReferenceEvaluator`` runs the copy: numpy float64 per node
(Conv via im2col and a float64 matmul), complete for the standard domain, slower (Python per node; measured
figures in ``docs/validation.md``). Anything neither engine can run leaves the float32 verdict as it is,
with the reason in the report.

Cost bounds (:class:`Float64Limits`): models with more than ``max_parameters`` floating parameters are not
widened (the copy holds every weight in float64: 8 bytes each, plus the activations of one batch in float64);
iterations stop once ``time_budget_s`` has been spent (at least one always runs) and the comparison then
uses the iterations done, saying so.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import one_line
from bnfold.validate.model_source import ModelSource

# Ops onnxruntime 1.32's CPU provider has no float64 kernel for (checked op by op): go straight to onnx.reference.
NO_ONNXRUNTIME_FLOAT64 = frozenset(
    {"Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "HardSigmoid", "HardSwish", "LpPool"}
)
_WIDENED = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_DOUBLE = onnx.TensorProto.DOUBLE
# Attributes naming an element type the node produces (Cast, EyeLike, RandomNormal..., ConstantOfShape has a value).
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Float64Limits:
    """Bounds on the float64 run: model size (floating parameters) and wall time over all iterations."""

    max_parameters: int = 50_000_000
    time_budget_s: float = 120.0


DEFAULT_LIMITS = Float64Limits()


def floating_parameters(proto: onnx.ModelProto) -> int:
    """How many floating elements the initializers hold (what widening to float64 would copy)."""
    total = 0
    for graph in _graphs(proto.graph):
        for tensor in graph.initializer:
            if tensor.data_type in _WIDENED:
                total += int(np.prod(tensor.dims, dtype=np.int64))
    return total


def as_float64_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose floating tensors, types and casts are all float64 (see module docstring).

    Precondition: external data, if any, has been loaded into ``proto`` (the copy must hold the weights).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for graph in _graphs(copy.graph):
        _widen_graph(graph)
    for function in copy.functions:
        for node in function.node:
            _widen_node(node)
    return copy


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph below it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _graphs(subgraph)


def _widen_graph(graph: onnx.GraphProto) -> None:
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in _WIDENED:
            graph.initializer[index].CopyFrom(_widened_tensor(tensor))
    for value_info in (*graph.input, *graph.output, *graph.value_info):
        if value_info.type.HasField("tensor_type") and value_info.type.tensor_type.elem_type in _WIDENED:
            value_info.type.tensor_type.elem_type = _DOUBLE
    for node in graph.node:
        _widen_node(node)


def _widened_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


def _widen_node(node: onnx.NodeProto) -> None:
    type_attribute = _TYPE_ATTRIBUTES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in _WIDENED:
            attribute.t.CopyFrom(_widened_tensor(attribute.t))
        elif attribute.name == type_attribute and attribute.i in _WIDENED:
            attribute.i = _DOUBLE
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for index, attribute in enumerate(node.attribute):
            if attribute.name in ("value_float", "value_floats"):  # float32 by definition: make it a double tensor
                values = np.asarray(attribute.f if attribute.name == "value_float" else list(attribute.floats))
                tensor = numpy_helper.from_array(values.astype(np.float64))
                node.attribute[index].CopyFrom(onnx.helper.make_attribute("value", tensor))


Runner = Callable[[Mapping[str, np.ndarray], Sequence[str]], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Float64Evaluator:
    """The float64 copy of a model ready to run: ``engine`` names what runs it."""

    engine: str
    runner: Runner
    load_s: float

    def run(self, batch: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """``{name: float64 array}`` for graph outputs and intermediate tensors ``names``."""
        feeds = {name: _widened_input(array) for name, array in batch.items()}
        return dict(zip(names, self.runner(feeds, list(names)), strict=True))


def _widened_input(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype.kind == "f" or array.dtype.name == "bfloat16" else array


def unavailable_reason(model: ModelSource, limits: Float64Limits) -> str | None:
    """Why the float64 run is not attempted for ``model`` (``None``: it is)."""
    parameters = floating_parameters(model.proto)
    if parameters > limits.max_parameters:
        return (
            f"the model has {parameters:,} floating parameters, above the float64 limit of "
            f"{limits.max_parameters:,} ({limits.max_parameters * 8 / 2**30:.1f} GiB in float64)"
        )
    return None


def make_evaluator(model: ModelSource, extra_outputs: Sequence[str]) -> Float64Evaluator:
    """The float64 copy of ``model`` (also producing ``extra_outputs``) on onnxruntime, else onnx.reference.

    Raises whatever both engines raise when neither can load the copy (the caller reports it).
    """
    started = time.perf_counter()
    loaded = dataclasses.replace(model, proto=_with_data(model), external_data_dir=None)
    widened = as_float64_model(loaded.with_extra_outputs(tuple(extra_outputs)).proto)
    try:
        missing = sorted({node.op_type for node in widened.graph.node} & NO_ONNXRUNTIME_FLOAT64)
        if missing:
            raise NotImplementedError(f"no float64 kernel for {', '.join(missing)}")
        runner = _onnxruntime_runner(widened)
        engine = "onnxruntime (float64 kernels)"
    except Exception as ort_error:  # a missing double kernel: NOT_IMPLEMENTED at session creation
        try:
            runner = _reference_runner(widened)
        except Exception as reference_error:
            raise RuntimeError(
                f"onnxruntime: {one_line(ort_error, 160)}; onnx.reference: {one_line(reference_error, 160)}"
            ) from reference_error
        engine = "onnx.reference (numpy float64; onnxruntime lacks a float64 kernel)"
    return Float64Evaluator(engine=engine, runner=runner, load_s=time.perf_counter() - started)


def _with_data(model: ModelSource) -> onnx.ModelProto:
    """The model with its external data read into memory (the float64 copy rewrites every weight)."""
    if model.external_data_dir is None:
        return model.proto
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    onnx.external_data_helper.load_external_data_for_model(proto, str(model.external_data_dir))
    return proto


def _onnxruntime_runner(proto: onnx.ModelProto) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(value) for value in session.run(list(names), dict(feeds))]

    return run


def _reference_runner(proto: onnx.ModelProto) -> Runner:
    from onnx.reference import ReferenceEvaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = ReferenceEvaluator(proto)

    def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return [np.asarray(value) for value in evaluator.run(list(names), dict(feeds))]

    return run
