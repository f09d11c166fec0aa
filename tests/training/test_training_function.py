"""The onnxscript functions on onnxruntime: every opset from 7, ranks 1–5, dtypes, gradient, CUDA."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from training_builders import BFLOAT16, CUDA, cuda_unusable_reason, onnx_type, relative_error, session

from bnfold.errors import UsageError
from bnfold.training import batch_norm_backward, batch_norm_forward, training_functions
from bnfold.training.function import DOMAIN, GRADIENT_FUNCTION, MEAN_FUNCTION, TRAINING_FUNCTION

SHAPES = [(7,), (6, 3), (4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2)]
TRAINING_INPUTS = ("X", "scale", "B", "input_mean", "input_var", "epsilon", "momentum")
TRAINING_OUTPUTS = ("Y", "running_mean", "running_var", "saved_mean", "saved_inv_std")


def training_model(opset: int, x_dtype, stats_dtype, *, float_outputs: bool = False) -> onnx.ModelProto:
    """A model calling ``bnfold.BatchNormalizationTraining`` directly; optionally casting outputs to float."""
    x_type, stats_type = onnx_type(x_dtype), onnx_type(stats_dtype)
    call_outputs = [f"{name}_raw" if float_outputs else name for name in TRAINING_OUTPUTS]
    nodes = [
        oh.make_node(
            TRAINING_FUNCTION,
            list(TRAINING_INPUTS),
            call_outputs,
            domain=DOMAIN,
            y_dtype=x_type,
            stats_dtype=stats_type,
        )
    ]
    if float_outputs:
        nodes += [
            oh.make_node("Cast", [raw], [name], to=TensorProto.FLOAT)
            for raw, name in zip(call_outputs, TRAINING_OUTPUTS, strict=True)
        ]
    input_types = [x_type, x_type, x_type, stats_type, stats_type, TensorProto.DOUBLE, TensorProto.DOUBLE]
    output_types = [x_type] + [stats_type] * 4 if not float_outputs else [TensorProto.FLOAT] * 5
    graph = oh.make_graph(
        nodes,
        "training_function",
        [oh.make_tensor_value_info(name, kind, None) for name, kind in zip(TRAINING_INPUTS, input_types, strict=True)],
        [
            oh.make_tensor_value_info(name, kind, None)
            for name, kind in zip(TRAINING_OUTPUTS, output_types, strict=True)
        ],
    )
    model = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid(DOMAIN, 1)],
        functions=list(training_functions(opset)),
    )
    model.ir_version = 8
    return model


def _feeds(rng, shape, x_dtype, stats_dtype, epsilon=1e-5, momentum=0.9) -> dict[str, np.ndarray]:
    channels = 1 if len(shape) == 1 else shape[1]
    return {
        "X": (1.5 + 2.0 * rng.standard_normal(shape)).astype(x_dtype),
        "scale": rng.uniform(0.5, 2.0, channels).astype(x_dtype),
        "B": rng.standard_normal(channels).astype(x_dtype),
        "input_mean": rng.standard_normal(channels).astype(stats_dtype),
        "input_var": rng.uniform(0.5, 2.0, channels).astype(stats_dtype),
        "epsilon": np.array(epsilon),
        "momentum": np.array(momentum),
    }


def _reference(feeds: dict[str, np.ndarray]):
    return batch_norm_forward(
        *(feeds[name] for name in TRAINING_INPUTS[:5]),
        epsilon=float(feeds["epsilon"]),
        momentum=float(feeds["momentum"]),
    )


def test_functions_import_the_requested_opset_and_need_nothing_newer() -> None:
    for opset in (7, 8, 14, 17, 18, 21):
        protos = training_functions(opset)
        assert [proto.name for proto in protos] == [MEAN_FUNCTION, TRAINING_FUNCTION, GRADIENT_FUNCTION]
        for proto in protos:
            assert proto.domain == DOMAIN
            assert {(entry.domain, entry.version) for entry in proto.opset_import} == {("", opset), (DOMAIN, 1)}
            op_types = {node.op_type for node in proto.node}
            assert "CastLike" not in op_types  # opset 15+
            assert not any(attribute.name.startswith("value_") for node in proto.node for attribute in node.attribute)
        (reduce_mean,) = (node for node in protos[0].node if node.op_type == "ReduceMean")
        assert len(reduce_mean.input) == (2 if opset >= 18 else 1)  # axes: input from ReduceMean-18 on


def test_functions_refuse_opsets_below_7() -> None:
    with pytest.raises(UsageError, match="need a default-domain opset >= 7, got 6"):
        training_functions(6)


@pytest.mark.parametrize("opset", [7, 9, 13, 15, 18, 21])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"rank{len(shape)}")
def test_training_function_matches_numpy_reference_on_onnxruntime_cpu(opset: int, shape) -> None:
    rng = np.random.default_rng(opset * 10 + len(shape))
    feeds = _feeds(rng, shape, np.float64, np.float64, epsilon=1e-3, momentum=0.7)
    outputs = session(training_model(opset, np.float64, np.float64)).run(None, feeds)
    for name, actual, expected in zip(TRAINING_OUTPUTS, outputs, _reference(feeds), strict=True):
        assert actual.dtype == np.float64 and actual.shape == expected.shape, name
        assert relative_error(actual, expected) <= 1e-12, name


@pytest.mark.parametrize(
    ("x_dtype", "stats_dtype"), [(np.float32, np.float32), (np.float16, np.float32), (np.float32, np.float16)]
)
def test_training_function_outputs_take_the_requested_dtypes(x_dtype, stats_dtype) -> None:
    rng = np.random.default_rng(1)
    feeds = _feeds(rng, (4, 3, 5), x_dtype, stats_dtype)
    outputs = session(training_model(15, x_dtype, stats_dtype)).run(None, feeds)
    expected_outputs = _reference(feeds)
    assert [output.dtype for output in outputs] == [np.dtype(x_dtype)] + [np.dtype(stats_dtype)] * 4
    for name, actual, expected in zip(TRAINING_OUTPUTS, outputs, expected_outputs, strict=True):
        tolerance = 1e-3 if np.dtype(np.float16) in (actual.dtype, expected.dtype) else 2e-7
        assert relative_error(actual, expected) <= tolerance, name


def test_training_function_accepts_bfloat16() -> None:
    rng = np.random.default_rng(2)
    feeds = _feeds(rng, (4, 3, 5), BFLOAT16, np.float32)
    runner = session(training_model(18, BFLOAT16, np.float32, float_outputs=True))
    values = {
        name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
        if array.dtype == BFLOAT16
        else ort.OrtValue.ortvalue_from_numpy(array)
        for name, array in feeds.items()
    }
    outputs = [value.numpy() for value in runner.run_with_ort_values(None, values)]
    expected = _reference(feeds)
    np.testing.assert_array_equal(outputs[0], expected.y.astype(np.float32))  # bfloat16 values, widened
    np.testing.assert_array_equal(outputs[1], expected.running_mean)


def test_training_function_keeps_a_mean_of_1e6_over_1e6_float32_elements() -> None:
    rng = np.random.default_rng(3)
    feeds = _feeds(rng, (1, 1, 1000, 1000), np.float32, np.float32)
    feeds["X"] = (1e6 + rng.standard_normal((1, 1, 1000, 1000))).astype(np.float32)
    outputs = session(training_model(17, np.float32, np.float32)).run(None, feeds)
    expected = _reference(feeds)
    assert relative_error(outputs[3], expected.saved_mean) == 0.0
    assert relative_error(outputs[4], expected.saved_inv_std) <= 1.2e-7
    assert relative_error(outputs[2], expected.running_var) <= 1.2e-7


def test_gradient_function_matches_numpy_backward() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 5))
    scale = rng.uniform(0.5, 2.0, 3)
    forward = batch_norm_forward(x, scale, np.zeros(3), np.zeros(3), np.ones(3), epsilon=1e-3)
    dy = rng.standard_normal(x.shape)
    names = ("dY", "X", "scale", "saved_mean", "saved_inv_std")
    graph = oh.make_graph(
        [
            oh.make_node(
                GRADIENT_FUNCTION,
                list(names),
                ["dX", "dscale", "dB"],
                domain=DOMAIN,
                x_dtype=TensorProto.DOUBLE,
                scale_dtype=TensorProto.DOUBLE,
            )
        ],
        "gradient",
        [oh.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in names],
        [oh.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in ("dX", "dscale", "dB")],
    )
    model = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", 13), oh.make_opsetid(DOMAIN, 1)],
        functions=list(training_functions(13)),
    )
    model.ir_version = 8
    feeds = dict(zip(names, (dy, x, scale, forward.saved_mean, forward.saved_inv_std), strict=True))
    expected = batch_norm_backward(dy, x, scale, forward.saved_mean, forward.saved_inv_std)
    for actual, wanted in zip(session(model).run(None, feeds), expected, strict=True):
        assert relative_error(actual, wanted) <= 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_training_function_matches_numpy_reference_on_onnxruntime_cuda(dtype) -> None:
    reason = cuda_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    rng = np.random.default_rng(5)
    feeds = _feeds(rng, (8, 4, 16, 16), dtype, np.float32)
    runner = session(training_model(18, dtype, np.float32), CUDA)
    assert runner.get_providers()[0] == CUDA
    outputs = runner.run(None, feeds)
    y_tolerance = {np.float16: 1e-3, np.float32: 2e-7, np.float64: 1e-12}[dtype]
    for name, actual, expected in zip(TRAINING_OUTPUTS, outputs, _reference(feeds), strict=True):
        # Statistics are float32 here: one rounding, whatever order the GPU summed in (double) first.
        assert relative_error(actual, expected) <= (y_tolerance if name == "Y" else 2e-7), name
