"""Folds inside If/Loop bodies (weights captured from the outer scope) and model-local functions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from rules_helpers import (
    assert_equivalent,
    assert_folded,
    assert_skipped,
    bn_arrays,
    bn_node,
    fold_proto,
    io,
    make_model,
    op_types,
    random_feeds,
)

import bnfold
from bnfold.passes import SkipReason
from bnfold.report import FoldStatus

F32 = np.float32


def subgraph_attribute(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def if_model() -> onnx.ModelProto:
    """``If(cond)``: then = Conv(X, W) → BN with W and BN params from the main graph; W is also read outside."""
    rng = np.random.default_rng(0)
    arrays = {"W": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(F32), **bn_arrays(4, F32)}
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["t_conv"], name="t_conv", pads=[1, 1, 1, 1]), bn_node("t_conv", "t_y")],
        "then",
        [],
        [io("t_y", F32, [1, 4, 5, 5])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["e_y"], name="e_conv", pads=[1, 1, 1, 1])],
        "else",
        [],
        [io("e_y", F32, [1, 4, 5, 5])],
    )
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    inputs = [io("X", F32, [1, 3, 5, 5]), io("cond", np.bool_, [])]
    return make_model(nodes, inputs, [io("Y", F32, [1, 4, 5, 5])], arrays)


def test_folds_inside_if_branch_with_weights_from_the_outer_scope():
    original = if_model()
    folded, report = fold_proto(original)
    (record,) = report.records
    assert_folded(record, "conv")
    assert record.graph == "main/if.then_branch"
    then_branch = subgraph_attribute(folded.graph.node[0], "then_branch")
    else_branch = subgraph_attribute(folded.graph.node[0], "else_branch")
    assert op_types(then_branch) == ["Conv"]
    # The folded weight lives in the branch; the outer W, still read by the else branch, keeps its bits.
    assert {i.name for i in then_branch.initializer} == {then_branch.node[0].input[1], then_branch.node[0].input[2]}
    assert then_branch.node[0].input[1] != "W" and else_branch.node[0].input[1] == "W"
    outer = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert sorted(outer) == ["W"]  # the BN parameters had no other reader and are gone
    np.testing.assert_array_equal(outer["W"], numpy_helper.to_array(original.graph.initializer[0]))
    for cond in (True, False):
        feeds = random_feeds(original, overrides={"cond": np.array(cond)})
        assert_equivalent(original, folded, F32, feeds)


def loop_model() -> onnx.ModelProto:
    """``Loop`` twice: v ← BN(Gemm(v, B)) with B and the BN params captured from the main graph."""
    rng = np.random.default_rng(1)
    arrays = {"B": (rng.standard_normal((4, 4)) * 0.5).astype(F32), **bn_arrays(4, F32), "trip": np.array(2)}
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Gemm", ["v_in", "B"], ["g"], name="gemm", beta=0.5),
            bn_node("g", "v_out"),
        ],
        "body",
        [io("i", np.int64, []), io("cond_in", np.bool_, []), io("v_in", F32, [2, 4])],
        [io("cond_out", np.bool_, []), io("v_out", F32, [2, 4])],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "X"], ["Y"], name="loop", body=body)]
    return make_model(nodes, [io("X", F32, [2, 4])], [io("Y", F32, [2, 4])], arrays)


def test_folds_inside_loop_body_with_weights_from_the_outer_scope():
    original = loop_model()
    folded, report = fold_proto(original)
    (record,) = report.records
    assert_folded(record, "gemm")
    assert record.graph == "main/loop.body"
    body = subgraph_attribute(folded.graph.node[0], "body")
    assert op_types(body) == ["Identity", "Gemm"]
    assert body.output[1].name == "v_out"
    assert sorted(i.name for i in folded.graph.initializer) == ["trip"]
    assert_equivalent(original, folded, F32)


# -- model-local functions ----------------------------------------------------------------------------------


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array))


def function_with_constant_weights() -> onnx.FunctionProto:
    rng = np.random.default_rng(2)
    constants = [constant_node("w", (rng.standard_normal((4, 3, 1, 1)) * 0.5).astype(F32))]
    constants += [constant_node(name, array) for name, array in bn_arrays(4, F32).items()]
    nodes = [*constants, helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    return helper.make_function("custom", "ConvBN", ["x"], ["y"], nodes, [helper.make_opsetid("", 17)])


def test_folds_inside_function_with_constant_weights():
    call = helper.make_node("ConvBN", ["X"], ["Y"], name="call", domain="custom")
    original = make_model(
        [call],
        [io("X", F32, [1, 3, 4, 4])],
        [io("Y", F32, [1, 4, 4, 4])],
        functions=[function_with_constant_weights()],
        extra_opsets={"custom": 1},
    )
    folded, report = fold_proto(original)
    (record,) = report.records
    assert_folded(record, "conv")
    assert record.graph == "function:custom:ConvBN"
    (function,) = folded.functions
    assert op_types(function) == ["Constant", "Constant", "Conv"]  # W rewritten in place, a new bias before Conv
    assert function.node[0].output[0] == "w" and function.node[2].output[0] == "y"
    assert_equivalent(original, folded, F32)


def function_with_weight_arguments(epsilon_reference: bool = False) -> onnx.FunctionProto:
    """``LinearBN(x, w, gamma, beta, mean, var) = BN(Gemm(x, w))``; optionally epsilon = @eps."""
    bn = bn_node("g", "y")
    bn.input[:] = ["g", "gamma", "beta", "mean", "var"]
    attributes = []
    if epsilon_reference:
        reference = onnx.AttributeProto()
        reference.name, reference.ref_attr_name, reference.type = "epsilon", "eps", onnx.AttributeProto.FLOAT
        bn.attribute.append(reference)
        attributes = ["eps"]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="gemm", transB=1), bn]
    return helper.make_function(
        "custom",
        "LinearBN",
        ["x", "w", "gamma", "beta", "mean", "var"],
        ["y"],
        nodes,
        [helper.make_opsetid("", 17)],
        attributes=attributes,
    )


def linear_call(index: int, weight: str, **attributes) -> onnx.NodeProto:
    params = [f"bn{index}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node(
        "LinearBN", ["X", weight, *params], [f"Y{index}"], name=f"call{index}", domain="custom", **attributes
    )


def linear_model(calls: list[onnx.NodeProto], extra_inputs=(), epsilon_reference=False) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    arrays = {}
    for index in range(len(calls)):
        arrays[f"w{index}"] = rng.standard_normal((6, 5)).astype(F32)
        arrays |= bn_arrays(6, F32, f"bn{index}", seed=index)
    used = {name for call in calls for name in call.input}
    arrays = {name: array for name, array in arrays.items() if name in used}
    return make_model(
        calls,
        [io("X", F32, [3, 5]), *extra_inputs],
        [io(f"Y{index}", F32, [3, 6]) for index in range(len(calls))],
        arrays,
        functions=[function_with_weight_arguments(epsilon_reference)],
        extra_opsets={"custom": 1},
    )


def test_folds_function_per_call_site_by_specialising_constant_arguments():
    calls = [linear_call(0, "w0"), linear_call(1, "w1"), linear_call(2, "runtime_w")]
    original = linear_model(calls, [io("runtime_w", F32, [6, 5])])
    folded, report = fold_proto(original)
    outcome = [(r.graph, r.status, r.reason) for r in report.records]
    assert outcome == [
        ("function:custom:LinearBN", FoldStatus.SKIPPED, SkipReason.BN_PARAMS_NOT_CONSTANT),
        ("function:custom:LinearBN_bnfold_1", FoldStatus.FOLDED, None),
        ("function:custom:LinearBN_bnfold_2", FoldStatus.FOLDED, None),
    ]
    assert "specialised for call 'call0'" in report.records[1].detail
    assert [(n.op_type, list(n.input)) for n in folded.graph.node] == [
        ("LinearBN_bnfold_1", ["X"]),
        ("LinearBN_bnfold_2", ["X"]),
        ("LinearBN", ["X", "runtime_w", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"]),
    ]
    functions = {f.name: f for f in folded.functions}
    assert sorted(functions) == ["LinearBN", "LinearBN_bnfold_1", "LinearBN_bnfold_2"]
    assert op_types(functions["LinearBN_bnfold_1"]).count("BatchNormalization") == 0
    assert list(functions["LinearBN_bnfold_1"].input) == ["x"]
    assert sorted(i.name for i in folded.graph.initializer) == [f"bn2_{p}" for p in ("beta", "gamma", "mean", "var")]
    assert_equivalent(original, folded, F32)


def test_folds_function_and_removes_it_when_every_call_is_specialised():
    original = linear_model([linear_call(0, "w0"), linear_call(1, "w1")])
    folded, report = fold_proto(original)
    assert [(r.graph, r.folded) for r in report.records] == [
        ("function:custom:LinearBN_bnfold_1", True),
        ("function:custom:LinearBN_bnfold_2", True),
    ]
    assert sorted(f.name for f in folded.functions) == ["LinearBN_bnfold_1", "LinearBN_bnfold_2"]
    assert len(folded.graph.initializer) == 0
    assert_equivalent(original, folded, F32)


def test_skips_when_function_weights_are_runtime_arguments():
    original = linear_model([linear_call(0, "runtime_w")], [io("runtime_w", F32, [6, 5])])
    folded, report = fold_proto(original)
    (record,) = report.records
    # The body's record stands; the specialisation tried for the call (weight still runtime) was discarded.
    assert_skipped(record, SkipReason.BN_PARAMS_NOT_CONSTANT)
    assert record.graph == "function:custom:LinearBN"
    assert [f.name for f in folded.functions] == ["LinearBN"]
    assert op_types(folded) == ["LinearBN"]
    assert folded.graph.node[0] == original.graph.node[0]  # the call is untouched
    assert_equivalent(original, folded, F32)


@pytest.mark.parametrize("epsilon", [1e-3, None], ids=["given", "default"])
def test_folds_function_with_attribute_reference_per_call_site(epsilon):
    attributes = {} if epsilon is None else {"eps": epsilon}
    original = linear_model([linear_call(0, "w0", **attributes)], epsilon_reference=True)
    folded, report = fold_proto(original)
    assert [(r.graph, r.status, r.reason) for r in report.records] == [
        ("function:custom:LinearBN_bnfold_1", FoldStatus.FOLDED, None)
    ]
    assert_equivalent(original, folded, F32)


def test_skips_when_producer_is_in_the_outer_graph():
    """Conv in the main graph, BN in an If branch: the branch cannot rename an outer value."""
    arrays = {"W": np.ones((4, 3, 1, 1), F32), **bn_arrays(4, F32)}
    then_graph = helper.make_graph([bn_node("c", "t_y")], "then", [], [io("t_y", F32, [1, 4, 5, 5])])
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["e_y"], name="relu")], "else", [], [io("e_y", F32, [1, 4, 5, 5])]
    )
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = [io("X", F32, [1, 3, 5, 5]), io("cond", np.bool_, [])]
    original = make_model(nodes, inputs, [io("Y", F32, [1, 4, 5, 5])], arrays)
    folded, report = fold_proto(original)
    (record,) = report.records
    assert_skipped(record, SkipReason.NEIGHBOUR_IN_OTHER_GRAPH)
    assert (record.graph, record.producer) == ("main/if.then_branch", "Conv")
    assert op_types(subgraph_attribute(folded.graph.node[1], "then_branch")) == ["BatchNormalization"]


@pytest.mark.parametrize(("function_opset", "folds"), [(21, True), (17, False)])
def test_skips_when_function_opset_gives_constant_another_schema(function_opset, folds):
    """Weights bound per call site become Constant nodes; Constant-21 differs from Constant-13 (opset 17)."""
    rng = np.random.default_rng(0)
    body = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    function = helper.make_function(
        "local", "Block", ["x", "w", "g", "b", "m", "v"], ["y"], body, [helper.make_opsetid("", function_opset)]
    )
    arrays = {"W": rng.standard_normal((2, 2, 1, 1))} | {n: rng.uniform(0.5, 1.5, 2) for n in ("G", "B", "M", "V")}
    graph = helper.make_graph(
        [helper.make_node("Block", ["X", "W", "G", "B", "M", "V"], ["Y"], domain="local", name="call")],
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    model = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)]
    )
    onnx.checker.check_model(model)
    folded, report = bnfold.fold(model)
    statuses = {(record.status, record.reason) for record in report.records}
    if folds:
        assert (FoldStatus.FOLDED, None) in statuses
    else:
        assert statuses == {(FoldStatus.SKIPPED, SkipReason.FUNCTION_OPSET_DIFFERS)}
    onnx.checker.check_model(ir.to_proto(folded))
