"""Constants in every form, IR-3 initializer inputs, shared weights, name collisions, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from fold_builders import ConvBN, assert_equivalent, op_types, run
from onnx import helper, numpy_helper

import bnfold
from bnfold.passes import FoldBatchNormPass
from bnfold.report import FoldStatus


def fold_proto(model: onnx.ModelProto, **options):
    folded, report = bnfold.fold(model, **options)
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    return proto, report


def move_initializer_to_node(model: onnx.ModelProto, name: str, how: str) -> onnx.ModelProto:
    """Replace initializer ``name`` by a Constant / ConstantOfShape / Identity(Constant) producing it."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(tensor)
    array = numpy_helper.to_array(tensor)
    if how == "constant":
        nodes = [helper.make_node("Constant", [], [name], value=tensor)]
    elif how == "identity":
        tensor.name = f"{name}_source"
        nodes = [
            helper.make_node("Constant", [], [f"{name}_source"], value=tensor),
            helper.make_node("Identity", [f"{name}_source"], [name]),
        ]
    elif how == "constant_of_shape":
        fill = numpy_helper.from_array(np.array([array.flat[0]], dtype=array.dtype))
        shape = numpy_helper.from_array(np.array(array.shape, dtype=np.int64), f"{name}_shape")
        model.graph.initializer.append(shape)
        nodes = [helper.make_node("ConstantOfShape", [f"{name}_shape"], [name], value=fill)]
    else:
        raise AssertionError(how)
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return model


@pytest.mark.parametrize("how", ["constant", "identity", "constant_of_shape"])
@pytest.mark.parametrize("name", ["W", "mean", "var"])
def test_folds_constants_given_as_nodes(how, name):
    model = move_initializer_to_node(ConvBN().build(), name, how)
    folded, report = fold_proto(model)
    assert report.records[0].status is FoldStatus.FOLDED
    assert op_types(folded) == ["Conv"]  # the constant nodes that fed only the fold are gone
    assert_equivalent(model, folded)


def test_folds_ir3_initializers_listed_as_graph_inputs_and_keeps_inputs_consistent():
    spec = ConvBN(opset=8, ir_version=3, bias=False)
    model = spec.build()
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    folded, report = fold_proto(model)
    assert report.records[0].status is FoldStatus.FOLDED
    initializers = {t.name for t in folded.graph.initializer}
    inputs = {i.name for i in folded.graph.input}
    assert initializers == {"W", "W_bias"}
    assert inputs == initializers | {"X"}  # every initializer listed, BN params removed from both
    assert_equivalent(model, folded)


def test_never_folds_a_true_runtime_weight_in_ir3():
    model = ConvBN(opset=8, ir_version=3).build()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info("W", weight.data_type, list(weight.dims)))
    _, report = bnfold.fold(model)
    assert report.records[0].reason is bnfold.SkipReason.WEIGHT_NOT_CONSTANT


def shared_weight_model() -> onnx.ModelProto:
    spec = ConvBN(bias=False)
    model = spec.build()
    arrays = spec.arrays()
    rng = np.random.default_rng(7)
    model.graph.node.extend(
        [
            helper.make_node("Conv", ["X", "W"], ["conv2_out"], name="conv2"),
            helper.make_node("BatchNormalization", ["conv2_out", "g2", "b2", "m2", "v2"], ["Y2"], name="bn2"),
            helper.make_node("Relu", ["W"], ["W_relu"], name="weight_reader"),
        ]
    )
    for name, array in {"g2": arrays["gamma"] * 2, "b2": arrays["beta"] + 1, "m2": arrays["mean"] - 1}.items():
        model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    model.graph.initializer.append(numpy_helper.from_array(rng.uniform(0.5, 1, 6).astype(np.float32), "v2"))
    model.graph.output.extend(
        [
            helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, [None] * 4),
            helper.make_tensor_value_info("W_relu", onnx.TensorProto.FLOAT, [6, 4, 3, 3]),
        ]
    )
    return model


def test_folds_shared_weights_into_separate_copies_without_mutating_the_original():
    model = shared_weight_model()
    original_weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W")).copy()
    folded, report = fold_proto(model)
    assert [r.status for r in report.records] == [FoldStatus.FOLDED, FoldStatus.FOLDED]
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv_weights = [n.input[1] for n in folded.graph.node if n.op_type == "Conv"]
    assert len(set(conv_weights)) == 2 and "W" not in conv_weights  # each conv its own folded copy
    np.testing.assert_array_equal(weights["W"], original_weight)  # still read by weight_reader, unchanged
    assert_equivalent(model, folded)


def test_shared_weight_tensor_object_is_never_mutated_in_place():
    model = ir.from_proto(shared_weight_model())
    weight_value = model.graph.initializers["W"]
    tensor_before = weight_value.const_value
    data_before = tensor_before.numpy().copy()
    FoldBatchNormPass()(model)
    assert model.graph.initializers["W"].const_value is tensor_before
    np.testing.assert_array_equal(tensor_before.numpy(), data_before)


def test_new_names_never_collide_with_existing_ones():
    model = ConvBN(bias=False).build()
    # occupy the names the fold would pick for a new bias
    for taken in ("W_bias", "W_bias_bnfold"):
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), taken))
    model.graph.node.append(helper.make_node("Relu", ["W_bias"], ["W_bias_bnfold_1"], name="occupies"))
    model.graph.output.append(helper.make_tensor_value_info("W_bias_bnfold_1", onnx.TensorProto.FLOAT, [1]))
    folded, _ = fold_proto(model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "W_bias_bnfold_2"
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names))


def test_keeps_the_weight_name_when_the_weight_is_not_shared():
    folded, _ = fold_proto(ConvBN().build())
    conv = folded.graph.node[0]
    assert list(conv.input) == ["X", "W", "B"]


def test_second_fold_changes_nothing_and_saves_identical_bytes(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(shared_weight_model(), source)
    first, first_report = bnfold.fold(source)
    bnfold.files.save_model(first, tmp_path / "first.onnx")
    second, second_report = bnfold.fold(tmp_path / "first.onnx")
    bnfold.files.save_model(second, tmp_path / "second.onnx")
    assert len(first_report.folded) == 2
    assert second_report.records == ()
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()


def test_fold_is_deterministic(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(shared_weight_model(), source)
    outputs = []
    for attempt in range(2):
        folded, _ = bnfold.fold(source)
        bnfold.files.save_model(folded, tmp_path / f"out{attempt}.onnx")
        outputs.append((tmp_path / f"out{attempt}.onnx").read_bytes())
    assert outputs[0] == outputs[1]


def test_runs_inside_an_onnx_ir_pass_manager():
    model = ir.from_proto(ConvBN().build())
    manager = ir.passes.PassManager([FoldBatchNormPass(), ir.passes.common.RemoveUnusedNodesPass()])
    result = manager(model)
    assert result.modified
    assert [node.op_type for node in result.model.graph] == ["Conv"]


def test_folds_inside_if_branches_with_outer_scope_weights():
    spec = ConvBN()
    inner = spec.nodes()
    inner[-1].output[0] = "Y_then"  # a subgraph must not redefine the outer "Y"
    then_graph = helper.make_graph(
        inner, "then", [], [helper.make_tensor_value_info("Y_then", onnx.TensorProto.FLOAT, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("Y_else", onnx.TensorProto.FLOAT, None)],
    )
    model = spec.build()
    model.graph.ClearField("node")
    model.graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph, name="if")
    )
    folded, report = fold_proto(model)
    assert [r.status for r in report.records] == [FoldStatus.FOLDED]
    assert report.records[0].graph == "main/if.then_branch"
    then_branch = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    then_ops = [n.op_type for n in then_branch.node]
    assert then_ops == ["Conv"]
    feeds = {"X": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32), "cond": np.array(True)}
    np.testing.assert_allclose(run(model, feeds)[0], run(folded, feeds)[0], rtol=1e-4, atol=1e-4)
