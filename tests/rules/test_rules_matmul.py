"""MatMul → BatchNormalization and MatMul → Add(constant) → BatchNormalization."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from rules_helpers import (
    DTYPE_IDS,
    FLOAT_DTYPES,
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

from bnfold.passes import FoldBatchNormPass, SkipReason

N, K, F = 3, 5, 4


def matmul_bn(*, dtype=np.float32, add: tuple[int, ...] | None = None, constant_first: bool = False, seed: int = 0):
    """``X[N, K] @ W[K, F] (+ c) → BN``; ``add`` is the shape of the added constant (None: no Add)."""
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype, seed=seed)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul")]
    bn_input = "m"
    if add is not None:
        arrays["c"] = rng.standard_normal(add).astype(dtype)
        operands = ["c", "m"] if constant_first else ["m", "c"]
        nodes.append(helper.make_node("Add", operands, ["a"], name="add"))
        bn_input = "a"
    nodes.append(bn_node(bn_input, "Y"))
    return make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_folds_matmul_keeping_the_shift_in_a_new_add(dtype):
    original = matmul_bn(dtype=dtype)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "matmul")
    assert (record.producer, record.output) == ("MatMul", "Y")
    assert (report.nodes_before, report.nodes_after) == (2, 2)
    assert op_types(folded) == ["MatMul", "Add"]
    add = folded.graph.node[1]
    assert add.input[0] == "m" and add.output[0] == "Y"
    assert initializer(folded, add.input[1]).shape == (F,)
    assert_equivalent(original, folded, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("add_shape", [(F,), (1, F), (), (1,)], ids=str)
def test_folds_matmul_through_added_bias(dtype, add_shape):
    original = matmul_bn(dtype=dtype, add=add_shape)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "matmul")
    assert "through Add 'add'" in record.detail
    assert (report.nodes_before, report.nodes_after) == (3, 2)
    assert op_types(folded) == ["MatMul", "Add"]
    assert folded.graph.node[1].name == "add"  # the existing Add is kept and carries c·s + t
    assert initializer(folded, folded.graph.node[1].input[1]).shape == (F,)
    assert_equivalent(original, folded, dtype)


def test_folds_matmul_through_add_with_constant_first():
    original = matmul_bn(add=(F,), constant_first=True)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert list(folded.graph.node[1].input)[1] == "m"
    assert_equivalent(original, folded, np.float32)


def test_folds_matmul_bn_bn_chain():
    dtype = np.float32
    rng = np.random.default_rng(2)
    arrays = {"W": rng.standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype), **bn_arrays(F, dtype, "bn2", 9)}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        bn_node("m", "mid"),
        bn_node("mid", "Y", prefix="bn2"),
    ]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    assert [(r.rule, r.folded) for r in report.records] == [("matmul", True), ("matmul", True)]
    assert "through Add" in report.records[1].detail  # the second BN folds through the first one's Add
    assert op_types(folded) == ["MatMul", "Add"]
    assert_equivalent(original, folded, dtype)


def test_folds_two_matmuls_sharing_a_weight_without_touching_the_other():
    dtype = np.float32
    rng = np.random.default_rng(4)
    arrays = {"W": rng.standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        helper.make_node("MatMul", ["X", "W"], ["Z"], name="plain"),
        bn_node("m", "Y"),
    ]
    outputs = [io("Y", dtype, [N, F]), io("Z", dtype, [N, F])]
    original = make_model(nodes, [io("X", dtype, [N, K])], outputs, arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    plain = next(node for node in folded.graph.node if node.name == "plain")
    np.testing.assert_array_equal(initializer(folded, plain.input[1]), arrays["W"])
    assert_equivalent(original, folded, dtype)


def test_skips_when_channel_axis_not_weight_axis():
    """[B, T, K] @ [K, F] → BN over axis 1 (T): the weight maps to axis 2, folding would be wrong."""
    dtype, batch, steps = np.float32, 2, 6
    arrays = {"W": np.ones((K, F), dtype), **bn_arrays(steps, dtype)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"), bn_node("m", "Y")]
    original = make_model(nodes, [io("X", dtype, [batch, steps, K])], [io("Y", dtype, [batch, steps, F])], arrays)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.CHANNEL_AXIS_NOT_WEIGHT_AXIS)
    assert record.rule == "matmul"
    assert "rank 3" in record.detail
    assert op_types(folded) == ["MatMul", "BatchNormalization"]


def test_skips_when_rank_unknown():
    """X declares no shape, so neither the model nor ONNX shape inference knows the MatMul output's rank."""
    dtype = np.float32
    arrays = {"W": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"), bn_node("m", "Y")]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    model = ir.serde.deserialize_model(original)
    model.graph.inputs[0].shape = None  # ONNX's checker refuses a shapeless input, so drop it in the IR
    report = FoldBatchNormPass()(model).report
    assert_skipped(only_record(report), SkipReason.RANK_UNKNOWN)
    assert [node.op_type for node in model.graph] == ["MatMul", "BatchNormalization"]


def test_folds_when_rank_found_by_shape_inference():
    """Relu → MatMul with no shape recorded on either (TorchScript's bias-less Linear): inference finds rank 2."""
    dtype = np.float32
    arrays = {"W": np.random.default_rng(0).standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["m"], name="matmul"),
        bn_node("m", "Y"),
    ]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert op_types(folded) == ["Relu", "MatMul", "Add"]
    assert {"r", "m"}.isdisjoint(v.name for v in folded.graph.value_info)  # inferred shapes are not written back
    assert_equivalent(original, folded, dtype)


def test_folds_when_rank_recorded_in_value_info():
    dtype = np.float32
    arrays = {"W": np.random.default_rng(0).standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["m"], name="matmul"),
        bn_node("m", "Y"),
    ]
    value_info = [io("m", dtype, [N, F])]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays, value_info=value_info)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert_equivalent(original, folded, dtype)


def test_skips_when_added_constant_not_per_channel():
    original = matmul_bn(add=(N, F))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL)
    assert (record.producer, record.rule) == ("MatMul", "matmul")
    assert op_types(folded) == ["MatMul", "Add", "BatchNormalization"]


def test_skips_when_add_has_no_constant_operand():
    dtype = np.float32
    arrays = {"W": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "R"], ["a"], name="residual"),
        bn_node("a", "Y"),
    ]
    inputs = [io("X", dtype, [N, K]), io("R", dtype, [N, F])]
    _, report = fold_proto(make_model(nodes, inputs, [io("Y", dtype, [N, F])], arrays))
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)
    assert record.producer == "Add"


def test_skips_when_bn_follows_relu():
    dtype = np.float32
    arrays = {"W": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        bn_node("r", "Y"),
    ]
    folded, report = fold_proto(make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays))
    assert_skipped(only_record(report), SkipReason.UNSUPPORTED_PRODUCER)
    assert op_types(folded) == ["MatMul", "Relu", "BatchNormalization"]


def test_skips_when_weight_not_constant():
    dtype = np.float32
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"), bn_node("m", "Y")]
    inputs = [io("X", dtype, [N, K]), io("W", dtype, [K, F])]
    _, report = fold_proto(make_model(nodes, inputs, [io("Y", dtype, [N, F])], bn_arrays(F, dtype)))
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)


def test_skips_when_add_output_shared():
    dtype = np.float32
    arrays = {"W": np.ones((K, F), dtype), "c": np.ones(F, dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "c"], ["a"], name="add"),
        bn_node("a", "Y"),
        helper.make_node("Relu", ["a"], ["R"], name="relu"),
    ]
    outputs = [io("Y", dtype, [N, F]), io("R", dtype, [N, F])]
    _, report = fold_proto(make_model(nodes, [io("X", dtype, [N, K])], outputs, arrays))
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_SHARED)
