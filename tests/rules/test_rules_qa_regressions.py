"""Regressions from the QA pass on real torch exports (H12's D2, D3, D4 and D11a).

- D2: raw dynamo's ``BatchNorm2d(affine=False)`` computes scale and bias from ``Shape(conv_out)`` and reads the
  Conv output through ``CastLike`` (type only): the Conv output is not "shared", and the parameters are constant.
- D3: a legacy export without constant folding writes a bias-less Linear as ``MatMul(X, Transpose(W))``.
- D4: LeViT at opset 13: ``Reshape(bn, Shape(m))`` → HardSigmoid → Mul leaves ONNX inference without a rank.
- D11a: a Linear over the last axis with a bias, then a channel BN: the root cause is the axis, not the bias.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from rules_helpers import (
    assert_equivalent,
    assert_folded,
    assert_skipped,
    bn_arrays,
    bn_node,
    fold_proto,
    io,
    make_model,
    only_record,
    op_types,
)

from bnfold.passes import SkipReason
from bnfold.passes.constants import ConstantResolver

F32 = np.float32


# -- D2: BN parameters computed from Shape(conv_out), CastLike(c, conv_out) ------------------------------------


def affine_false_conv_bn(*, record_shape: bool, data_reader: bool = False):
    """Conv → BN whose scale/bias are ``Expand(CastLike(1|0, c), Shape(c, 1, 2))`` (dynamo, ``optimize=False``)."""
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(F32),
        "B": rng.standard_normal(4).astype(F32),
        "bn_mean": rng.standard_normal(4).astype(F32),
        "bn_var": rng.uniform(0.2, 2.0, 4).astype(F32),
    }
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"], name="conv")]
    for name, fill in (("scale", 1.0), ("bias", 0.0)):
        nodes += [
            helper.make_node("Constant", [], [f"{name}_c"], value_floats=[fill]),
            helper.make_node("CastLike", [f"{name}_c", "c"], [f"{name}_cl"]),
            helper.make_node("Shape", ["c"], [f"{name}_n"], start=1, end=2),
            helper.make_node("Expand", [f"{name}_cl", f"{name}_n"], [name]),
        ]
    if data_reader:  # a real data reader of the Conv output: the fold would change what it sees
        nodes.append(helper.make_node("CastLike", ["c", "X"], ["c_copy"]))
    nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "bias", "bn_mean", "bn_var"], ["Y"], name="bn"))
    outputs = [io("Y", F32, [2, 4, 4, 4])] + ([io("c_copy", F32, [2, 4, 4, 4])] if data_reader else [])
    value_info = [io("c", F32, [2, 4, 4, 4])] if record_shape else []
    return make_model(nodes, [io("X", F32, [2, 3, 6, 6])], outputs, arrays, value_info=value_info)


@pytest.mark.parametrize("record_shape", [True, False], ids=["recorded", "inferred"])
def test_folds_conv_bn_with_parameters_from_shape_of_conv_output(record_shape):
    original = affine_false_conv_bn(record_shape=record_shape)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert op_types(folded) == ["Conv"]  # the computed scale/bias chains are pruned
    assert_equivalent(original, folded, F32)


def test_skips_when_conv_output_is_read_as_data_besides_shape_and_type():
    original = affine_false_conv_bn(record_shape=True, data_reader=True)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_SHARED)
    assert op_types(folded) == op_types(original)


# -- D3: MatMul(X, Transpose(W)) -------------------------------------------------------------------------------


def transposed_matmul_bn(*, perm: list[int] | None = [1, 0], runtime_weight: bool = False):  # noqa: B006
    rng = np.random.default_rng(1)
    arrays = bn_arrays(4, F32)
    if not runtime_weight:
        arrays["W"] = rng.standard_normal((4, 5)).astype(F32)  # torch's Linear weight [out, in]
    attributes = {} if perm is None else {"perm": perm}
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="transpose", **attributes),
        helper.make_node("MatMul", ["X", "Wt"], ["m"], name="matmul"),
        bn_node("m", "Y"),
    ]
    inputs = [io("X", F32, [3, 5])] + ([io("W", F32, [4, 5])] if runtime_weight else [])
    return make_model(nodes, inputs, [io("Y", F32, [3, 4])], arrays, opset=13)


@pytest.mark.parametrize("perm", [[1, 0], None], ids=["perm", "default_perm"])
def test_folds_matmul_with_transposed_constant_weight(perm):
    original = transposed_matmul_bn(perm=perm)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert op_types(folded) == ["MatMul", "Add"]  # the orphaned Transpose (and W) are pruned
    assert "W" not in {i.name for i in folded.graph.initializer}
    assert_equivalent(original, folded, F32)


def test_skips_when_transpose_reads_a_runtime_value():
    original = transposed_matmul_bn(runtime_weight=True)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)
    assert op_types(folded) == ["Transpose", "MatMul", "BatchNormalization"]


def test_folds_forward_and_backward_bn_into_one_transposed_matmul():
    """``Relu → BN_a → MatMul(·, Transpose(W)) → BN_b`` (legacy mlp without constant folding): both fold."""
    rng = np.random.default_rng(2)
    arrays = {"W": rng.standard_normal((4, 5)).astype(F32), **bn_arrays(5, F32, "a", 3), **bn_arrays(4, F32, "b", 4)}
    nodes = [
        helper.make_node("Relu", ["X"], ["r"]),
        bn_node("r", "ra", "a"),
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["ra", "Wt"], ["m"], name="matmul"),
        bn_node("m", "Y", "b"),
    ]
    original = make_model(nodes, [io("X", F32, [3, 5])], [io("Y", F32, [3, 4])], arrays, opset=13)
    folded, report = fold_proto(original)
    assert len(report.folded) == 2, report.records
    assert "Transpose" not in op_types(folded) and "BatchNormalization" not in op_types(folded)
    assert_equivalent(original, folded, F32)


def test_transpose_of_a_rewritten_source_is_evaluated_afresh():
    """The through-reshape rule scales a Transpose's source in place: no memoised value may go stale."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 5)).astype(F32)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["X", "Wt"], ["Y"])]
    model = ir.from_proto(make_model(nodes, [io("X", F32, [3, 5])], [io("Y", F32, [3, 4])], {"W": weight}))
    resolver = ConstantResolver(model)
    transposed = model.graph.node(0).outputs[0]
    np.testing.assert_array_equal(resolver.array(transposed), weight.T)
    source = model.graph.initializers["W"]
    source.const_value = ir.Tensor(weight * 2)
    np.testing.assert_array_equal(resolver.array(transposed), (weight * 2).T)


# -- D4: LeViT at opset 13 (hardswish decomposed) -------------------------------------------------------------


def test_folds_both_levit_bns_after_reshape_to_shape_of_matmul():
    """``MatMul → Flatten → BN → Reshape(·, Shape(m)) → HardSigmoid → Mul → MatMul → Flatten → BN → Reshape``."""
    rng = np.random.default_rng(6)
    arrays = {
        "W1": rng.standard_normal((8, 6)).astype(F32),
        "W2": rng.standard_normal((6, 5)).astype(F32),
        **bn_arrays(6, F32, "bn1", 1),
        **bn_arrays(5, F32, "bn2", 2),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["m1"], name="lin1"),
        helper.make_node("Flatten", ["m1"], ["f1"], axis=2),
        bn_node("f1", "b1", "bn1"),
        helper.make_node("Shape", ["m1"], ["s1"]),
        helper.make_node("Reshape", ["b1", "s1"], ["r1"]),
        helper.make_node("HardSigmoid", ["r1"], ["h"], alpha=1 / 6),
        helper.make_node("Mul", ["r1", "h"], ["x2"]),
        helper.make_node("MatMul", ["x2", "W2"], ["m2"], name="lin2"),
        helper.make_node("Flatten", ["m2"], ["f2"], axis=2),
        bn_node("f2", "b2", "bn2"),
        helper.make_node("Shape", ["m2"], ["s2"]),
        helper.make_node("Reshape", ["b2", "s2"], ["Y"]),
    ]
    original = make_model(nodes, [io("X", F32, [2, 3, 8])], [io("Y", F32, [2, 3, 5])], arrays, opset=13)
    folded, report = fold_proto(original)
    assert len(report.folded) == 2, report.records
    assert "BatchNormalization" not in op_types(folded)
    assert_equivalent(original, folded, F32)


# -- D11a: Linear over the last axis with a bias, then BN over axis 1 ------------------------------------------


def test_skips_when_linear_with_bias_maps_the_last_axis_and_bn_normalises_axis_1():
    rng = np.random.default_rng(7)
    arrays = {
        "W": rng.standard_normal((6, 6)).astype(F32),
        "c": rng.standard_normal(6).astype(F32),
        **bn_arrays(6, F32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "c"], ["a"], name="add"),
        bn_node("a", "Y"),
    ]
    original = make_model(nodes, [io("X", F32, [2, 6, 6])], [io("Y", F32, [2, 6, 6])], arrays)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.CHANNEL_AXIS_NOT_WEIGHT_AXIS)
    assert op_types(folded) == op_types(original)


# -- the evaluator's Transpose and Shape of a runtime value -----------------------------------------------------


def evaluate_output(nodes, arrays=None, inputs=None, value_info=None) -> np.ndarray | None:
    """The resolver's value of graph output ``out`` (the model is unchecked: some cases are invalid on purpose)."""
    out = [helper.make_empty_tensor_value_info("out")]
    graph = helper.make_graph(nodes, "g", inputs or [], out, [], value_info=value_info or [])
    for name, array in (arrays or {}).items():
        graph.initializer.append(helper.make_tensor(name, 1, array.shape, array.reshape(-1).tolist()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    return ConstantResolver(model).array(model.graph.outputs[0])


@pytest.mark.parametrize("perm", [[2, 0, 1], [0, 1, 2], None], ids=str)
def test_transpose_of_a_constant_is_evaluated(perm):
    data = np.arange(24, dtype=F32).reshape(2, 3, 4)
    attributes = {} if perm is None else {"perm": perm}
    result = evaluate_output([helper.make_node("Transpose", ["A"], ["out"], **attributes)], {"A": data})
    np.testing.assert_array_equal(result, np.transpose(data, perm))


@pytest.mark.parametrize("perm", [[0, 0, 1], [0, 1], [0, 1, 3]], ids=str)
def test_transpose_with_an_invalid_perm_is_not_constant(perm):
    data = np.arange(24, dtype=F32).reshape(2, 3, 4)
    assert evaluate_output([helper.make_node("Transpose", ["A"], ["out"], perm=perm)], {"A": data}) is None


def test_transpose_of_a_runtime_value_is_not_constant():
    nodes = [helper.make_node("Transpose", ["X"], ["out"], perm=[1, 0])]
    assert evaluate_output(nodes, inputs=[io("X", F32, [2, 3])]) is None


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "inferred"])
def test_shape_of_a_runtime_value_with_static_dimensions_is_constant(record):
    nodes = [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Shape", ["r"], ["out"], start=1, end=2)]
    value_info = [io("r", F32, [2, 5, 7])] if record else []
    np.testing.assert_array_equal(evaluate_output(nodes, inputs=[io("X", F32, [2, 5, 7])], value_info=value_info), [5])


def test_shape_of_a_runtime_value_with_a_symbolic_dimension_is_not_constant():
    nodes = [helper.make_node("Shape", ["X"], ["out"], start=0, end=1)]
    assert evaluate_output(nodes, inputs=[io("X", F32, ["N", 5])]) is None


# -- LeViT below opset 14: MatMul of unknown rank → Flatten(axis ≥ 2) → BN ------------------------------------


def matmul_flatten_bn(*, flatten_axis: int, bias: bool):
    """``Reshape(X, S) → MatMul(W [4, 6]) [→ Add(b)] → Flatten(axis) → BN(6)``: ``S`` is a runtime shape of
    symbolic length, so neither the model nor shape inference knows the MatMul's rank."""
    rng = np.random.default_rng(3)
    arrays = {"W": rng.standard_normal((4, 6)).astype(F32), **bn_arrays(6, F32)}
    nodes = [
        helper.make_node("Reshape", ["X", "S"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "W"], ["m"], name="matmul"),
    ]
    flatten_input = "m"
    if bias:
        arrays["b"] = rng.standard_normal(6).astype(F32)
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"], name="add"))
        flatten_input = "mb"
    nodes += [
        helper.make_node("Flatten", [flatten_input], ["f"], name="flatten", axis=flatten_axis),
        bn_node("f", "Y"),
    ]
    inputs = [io("X", F32, [2, 5, 4]), helper.make_tensor_value_info("S", onnx.TensorProto.INT64, ["k"])]
    return make_model(nodes, inputs, [io("Y", F32, ["n", 6])], arrays)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_folds_matmul_of_unknown_rank_through_flatten_axis_2(bias: bool) -> None:
    original = matmul_flatten_bn(flatten_axis=2, bias=bias)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert op_types(folded) == ["Reshape", "MatMul", "Add", "Flatten"]
    x = np.random.default_rng(4).standard_normal((2, 5, 4)).astype(F32)
    assert_equivalent(original, folded, feeds={"X": x, "S": np.array([2, 5, 4], dtype=np.int64)})


def test_skips_when_flatten_axis_1_hides_the_rank() -> None:
    # axis 1 on an input of unknown rank: the BN's axis 1 may be the MatMul's last axis or not — no proof.
    folded, report = fold_proto(matmul_flatten_bn(flatten_axis=1, bias=False))
    assert_skipped(only_record(report), SkipReason.RANK_UNKNOWN)
    assert "BatchNormalization" in op_types(folded)
