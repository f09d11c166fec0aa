"""DecomposeTrainingBatchNorm / lower_training: what is rewritten, what is refused, and that it runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as oh
from training_builders import bn_inputs, bn_model, relative_error, run

import bnfold
from bnfold.errors import InvalidModelError, UsageError
from bnfold.training import evaluate_batch_norm_node, lower_training
from bnfold.training.decompose import DecomposeTrainingBatchNorm, find_training_batch_norms
from bnfold.training.function import DOMAIN, MEAN_FUNCTION, TRAINING_FUNCTION


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _lower_and_compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, opset: int) -> onnx.ModelProto:
    """Lower, check, run on onnxruntime CPU and compare every output with the node evaluator."""
    lowered, count = lower_training(model)
    assert count == 1
    proto = ir.to_proto(lowered)
    onnx.checker.check_model(proto, full_check=True)
    bn_node = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    x = np.maximum(feeds["X"], 0) if "relu" in {node.name for node in model.graph.node} else feeds["X"]
    expected = [
        output
        for output in evaluate_batch_norm_node(bn_node, [x, *list(feeds.values())[1:]], opset=opset)
        if output is not None
    ]
    actual = run(proto, feeds)
    assert [output.name for output in proto.graph.output] == [output.name for output in model.graph.output]
    for got, wanted in zip(actual, expected, strict=True):
        assert got.dtype == wanted.dtype and got.shape == wanted.shape
        assert relative_error(got, wanted) <= 1.2e-7  # bit-exact or one float32 rounding apart
    return proto


@pytest.mark.parametrize(
    ("opset", "outputs", "attributes"),
    [
        (15, 3, {"training_mode": 1}),
        (15, ["Y", "", "running_var"], {"training_mode": 1}),
        (15, 1, {"training_mode": 1}),
        (14, 3, {"training_mode": 1, "epsilon": 1e-3, "momentum": 0.6}),
        (21, 3, {"training_mode": 1}),
        (9, 5, {}),
        (9, ["Y", "running_mean", "", "", "saved_inv_std"], {}),
        (7, 5, {"spatial": 1}),
    ],
)
def test_lowers_training_batch_norm_and_runs_on_onnxruntime(opset, outputs, attributes) -> None:
    model = bn_model(opset, outputs=outputs, attributes=attributes, x_from_relu=True)
    proto = _lower_and_compare(model, bn_inputs(np.random.default_rng(opset), (2, 3, 4, 5)), opset=opset)
    assert _op_types(proto) == ["Relu", "Constant", "Constant", TRAINING_FUNCTION]
    assert {function.name for function in proto.functions} == {MEAN_FUNCTION, TRAINING_FUNCTION}
    assert {(entry.domain, entry.version) for entry in proto.opset_import} == {("", opset), (DOMAIN, 1)}
    assert proto.ir_version == 8


def test_lowers_spatial_zero_by_flattening_x() -> None:
    model = bn_model(7, outputs=5, attributes={"spatial": 0}, x_shape=(4, 3, 2), param_shape=(3, 2))
    feeds = bn_inputs(np.random.default_rng(0), (4, 3, 2), param_shape=(3, 2))
    proto = _lower_and_compare(model, feeds, opset=7)
    assert _op_types(proto) == ["Constant", "Constant", "Flatten", TRAINING_FUNCTION, "Shape", "Reshape"]


@pytest.mark.parametrize("x_shape", [(9,), (6, 3), (2, 3, 2, 2, 2)], ids=lambda s: f"rank{len(s)}")
def test_lowers_every_rank(x_shape) -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1}, x_shape=x_shape)
    _lower_and_compare(model, bn_inputs(np.random.default_rng(len(x_shape)), x_shape), opset=15)


def test_mixed_precision_keeps_opset_15_dtypes() -> None:
    model = bn_model(
        15,
        outputs=3,
        attributes={"training_mode": 1},
        x_dtype=np.float16,
        scale_dtype=np.float32,
        stats_dtype=np.float64,
    )
    feeds = bn_inputs(
        np.random.default_rng(1), (2, 3, 4, 5), x_dtype=np.float16, scale_dtype=np.float32, stats_dtype=np.float64
    )
    lowered, _ = lower_training(model)
    y, running_mean, running_var = run(ir.to_proto(lowered), feeds)
    assert (y.dtype, running_mean.dtype, running_var.dtype) == (np.float16, np.float64, np.float64)
    _, expected_mean, expected_var = evaluate_batch_norm_node(model.graph.node[0], list(feeds.values()), opset=15)
    assert relative_error(running_mean, expected_mean) <= 1e-15
    assert relative_error(running_var, expected_var) <= 1e-15


def test_shape_inference_recovers_an_untyped_x() -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1}, x_from_relu=True, typed_intermediate=False)
    _lower_and_compare(model, bn_inputs(np.random.default_rng(2), (2, 3, 4, 5)), opset=15)


def test_unknown_dtype_raises_invalid_model_error() -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1}, x_from_relu=True, typed_intermediate=False)
    model.graph.node[0].op_type, model.graph.node[0].domain = "Mystery", "com.example"
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    with pytest.raises(InvalidModelError, match=r"node 'bn': the dtype of X \('X_relu'\) is unknown even after"):
        lower_training(model)


def test_inference_batch_norm_is_left_alone() -> None:
    model = bn_model(15, outputs=1)
    lowered, count = lower_training(model)
    assert count == 0
    assert _op_types(ir.to_proto(lowered)) == ["BatchNormalization"]
    assert not lowered.functions and DOMAIN not in lowered.opset_imports
    assert DecomposeTrainingBatchNorm()(ir.from_proto(model)).modified is False


def test_two_training_nodes_share_one_function_and_keep_inference_ones() -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1}, name="first")
    model.graph.node.extend(
        [
            oh.make_node(
                "BatchNormalization",
                ["Y", "scale", "B", "mean", "var"],
                ["Y2", "rm2", "rv2"],
                name="second",
                training_mode=1,
            ),
            oh.make_node("BatchNormalization", ["Y2", "scale", "B", "mean", "var"], ["Y3"], name="inference"),
        ]
    )
    model.graph.output.extend(
        [
            oh.make_tensor_value_info("Y3", TensorProto.FLOAT, [2, 3, 4, 5]),
            oh.make_tensor_value_info("rm2", TensorProto.FLOAT, [3]),
        ]
    )
    result = DecomposeTrainingBatchNorm()(ir.from_proto(model))
    assert result.modified and result.rewritten == ("first", "second")
    proto = ir.to_proto(result.model)
    assert _op_types(proto).count(TRAINING_FUNCTION) == 2
    assert _op_types(proto)[-1] == "BatchNormalization"
    assert len(proto.functions) == 2
    outputs = run(proto, bn_inputs(np.random.default_rng(3), (2, 3, 4, 5)))
    assert len(outputs) == 5


def test_lowers_batch_norm_inside_a_subgraph() -> None:
    inner = bn_model(15, outputs=1, attributes={"training_mode": 1}).graph
    inner_graph = oh.make_graph(
        list(inner.node), "then_branch", [], [oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    )
    else_graph = oh.make_graph(
        [oh.make_node("Identity", ["X"], ["Y_else"])],
        "else_branch",
        [],
        [oh.make_tensor_value_info("Y_else", TensorProto.FLOAT, None)],
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["condition"], ["out"], then_branch=inner_graph, else_branch=else_graph)],
        "outer",
        [oh.make_tensor_value_info("condition", TensorProto.BOOL, []), *inner.input],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 15)])
    assert len(find_training_batch_norms(ir.from_proto(model))) == 1
    lowered, count = lower_training(model)
    assert count == 1
    feeds = bn_inputs(np.random.default_rng(4), (2, 3, 4, 5))
    (out,) = run(ir.to_proto(lowered), {"condition": np.array(True), **feeds})
    (expected,) = evaluate_batch_norm_node(inner.node[0], list(feeds.values()), opset=15)
    assert relative_error(out, expected) <= 1.2e-7


def test_lowering_twice_changes_nothing_more() -> None:
    lowered, _ = lower_training(bn_model(15, outputs=3, attributes={"training_mode": 1}))
    again, count = lower_training(lowered)
    assert count == 0
    assert onnx.printer.to_text(ir.to_proto(again)) == onnx.printer.to_text(ir.to_proto(lowered))


def test_given_ir_model_is_not_modified() -> None:
    original = ir.from_proto(bn_model(15, outputs=3, attributes={"training_mode": 1}))
    lowered, count = lower_training(original)
    assert count == 1 and lowered is not original
    assert [node.op_type for node in original.graph] == ["BatchNormalization"]
    assert not original.functions


def test_opset_6_training_batch_norm_is_refused() -> None:
    model = bn_model(6, outputs=1)  # is_test=0 by default: training
    with pytest.raises(UsageError, match="training-mode BatchNormalization at opset 6 cannot be lowered"):
        lower_training(model)


def test_invalid_batch_norm_node_raises_invalid_model_error() -> None:
    model = bn_model(9, outputs=3)
    with pytest.raises(InvalidModelError, match="BatchNormalization-9 node 'bn': 3 outputs"):
        lower_training(model)


def test_conflicting_bnfold_domain_version_is_refused() -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1})
    model.opset_import.append(oh.make_opsetid(DOMAIN, 2))
    with pytest.raises(InvalidModelError, match="imports domain 'bnfold' at version 2, not 1"):
        lower_training(model)


def test_lower_training_is_reexported_lazily_from_bnfold() -> None:
    assert bnfold.lower_training is lower_training


def test_unnamed_nodes_get_unique_names_onnxruntime_accepts() -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1}, name="")
    model.graph.node.append(
        oh.make_node("BatchNormalization", ["Y", "scale", "B", "mean", "var"], ["Y2", "rm2", "rv2"], training_mode=1)
    )
    model.graph.output[0].name = "Y2"
    lowered, count = lower_training(model)
    proto = ir.to_proto(lowered)
    node_names = [node.name for node in proto.graph.node]
    value_names = [output for node in proto.graph.node for output in node.output]
    assert count == 2
    assert len(set(node_names)) == len(node_names) == 6 and all(node_names)
    assert len(set(value_names)) == len(value_names)
    outputs = run(proto, bn_inputs(np.random.default_rng(5), (2, 3, 4, 5)))
    assert [output.shape for output in outputs] == [(2, 3, 4, 5), (3,), (3,)]
