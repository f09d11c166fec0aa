"""Gemm → BatchNormalization: transA/transB, alpha/beta, every broadcastable C, dtypes, chains, branches, skips."""

from __future__ import annotations

import numpy as np
import onnx
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

import bnfold
from bnfold.errors import UsageError
from bnfold.passes import SkipReason

N, K, F = 3, 5, 4


def gemm_bn(
    *,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    c_shape: tuple[int, ...] | None = (F,),
    dtype=np.float32,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b_shape = (F, K) if trans_b else (K, F)
    arrays = {"B": rng.standard_normal(b_shape).astype(dtype), **bn_arrays(F, dtype, seed=seed)}
    inputs = ["X", "B"]
    if c_shape is not None:
        arrays["C"] = rng.standard_normal(c_shape).astype(dtype)
        inputs.append("C")
    attributes = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", **attributes), bn_node("g", "Y")]
    x_shape = [K, N] if trans_a else [N, K]
    return make_model(nodes, [io("X", dtype, x_shape)], [io("Y", dtype, [N, F])], arrays)


def gemm_attribute(model: onnx.ModelProto, name: str) -> float:
    (gemm,) = [node for node in model.graph.node if node.op_type == "Gemm"]
    return next(helper.get_attribute_value(a) for a in gemm.attribute if a.name == name)


def assert_gemm_fold(original: onnx.ModelProto, dtype=np.float32) -> onnx.ModelProto:
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "gemm")
    assert (record.producer, record.producer_node, record.output) == ("Gemm", "gemm", "Y")
    assert (report.nodes_before, report.nodes_after) == (2, 1)
    assert op_types(folded) == ["Gemm"]
    assert gemm_attribute(folded, "beta") == 1.0
    assert folded.graph.output[0].name == "Y"
    assert_equivalent(original, folded, dtype)
    return folded


@pytest.mark.parametrize("c_shape", [None, (), (1,), (F,), (1, F), (N, 1), (1, 1), (N, F)], ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.0, 2.5, -0.75])
def test_folds_gemm_with_every_c_shape_and_beta(c_shape, beta):
    folded = assert_gemm_fold(gemm_bn(c_shape=c_shape, beta=beta, alpha=0.5))
    (c,) = [i for i in folded.graph.initializer if i.name == folded.graph.node[0].input[2]]
    kept_c_shape = c_shape if c_shape is not None and beta != 0.0 else ()  # beta = 0 ignores C
    expected_shape = np.broadcast_shapes(kept_c_shape, (F,))
    assert tuple(c.dims) == expected_shape


@pytest.mark.parametrize("trans_a", [0, 1], ids=["A", "At"])
@pytest.mark.parametrize("trans_b", [0, 1], ids=["B", "Bt"])
@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_folds_gemm_with_transposes_and_alpha(trans_a, trans_b, alpha):
    folded = assert_gemm_fold(gemm_bn(trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=1.5))
    assert gemm_attribute(folded, "transB") == trans_b
    assert gemm_attribute(folded, "alpha") == pytest.approx(alpha)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c_shape", [None, (F,)], ids=["no_bias", "bias"])
def test_folds_gemm_in_every_float_dtype(dtype, c_shape):
    folded = assert_gemm_fold(gemm_bn(dtype=dtype, c_shape=c_shape, trans_b=1, beta=2.0), dtype)
    assert {i.data_type for i in folded.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}


def test_oracle_detects_the_classic_beta_misfold():
    """Writing C·s + t while keeping beta != 1 is wrong; the equivalence check must say so."""
    original = gemm_bn(beta=2.5)
    folded, _ = fold_proto(original)
    arrays = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    affine_scale = arrays["bn_gamma"] / np.sqrt(arrays["bn_var"] + 1e-5)
    misfolded_c = arrays["C"] * affine_scale + (arrays["bn_beta"] - arrays["bn_mean"] * affine_scale)
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    for node in broken.graph.node:
        for attribute in node.attribute:
            if attribute.name == "beta":
                attribute.f = 2.5
    for initializer in broken.graph.initializer:
        if initializer.name == broken.graph.node[0].input[2]:
            initializer.CopyFrom(numpy_helper.from_array(misfolded_c.astype(np.float32), initializer.name))
    with pytest.raises(AssertionError, match="relative error"):
        assert_equivalent(original, broken, np.float32)


def test_folds_gemm_with_runtime_c_when_beta_is_zero():
    dtype = np.float32
    arrays = {"B": np.random.default_rng(0).standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype)}
    nodes = [helper.make_node("Gemm", ["X", "B", "C"], ["g"], name="gemm", beta=0.0), bn_node("g", "Y")]
    inputs = [io("X", dtype, [N, K]), io("C", dtype, [F])]
    original = make_model(nodes, inputs, [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "gemm")
    assert folded.graph.node[0].input[2] != "C"  # the ignored runtime C is replaced by the shift
    assert_equivalent(original, folded, dtype)


def test_folds_gemm_bn_bn_chain():
    dtype = np.float32
    rng = np.random.default_rng(3)
    arrays = {"B": rng.standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype), **bn_arrays(F, dtype, "bn2", 7)}
    nodes = [
        helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm", beta=3.0),
        bn_node("g", "mid"),
        bn_node("mid", "Y", prefix="bn2"),
    ]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    assert [r.rule for r in report.records] == ["gemm", "gemm"]
    assert all(r.folded for r in report.records)
    assert (report.nodes_before, report.nodes_after) == (3, 1)
    assert op_types(folded) == ["Gemm"]
    assert {i.name for i in folded.graph.initializer} == {"B", "B_C"}  # every BN parameter is gone
    assert_equivalent(original, folded, dtype)


def test_folds_two_gemm_branches_reading_one_input_and_one_weight():
    """Both branches fold; the shared B is copied for one of them, never scaled twice."""
    dtype = np.float32
    rng = np.random.default_rng(4)
    arrays = {"B": rng.standard_normal((K, F)).astype(dtype), **bn_arrays(F, dtype, "bn1", 1)}
    arrays |= bn_arrays(F, dtype, "bn2", 2)
    nodes = [
        helper.make_node("Gemm", ["X", "B"], ["g1"], name="gemm1"),
        helper.make_node("Gemm", ["X", "B"], ["g2"], name="gemm2", alpha=2.0),
        bn_node("g1", "Y1", prefix="bn1"),
        bn_node("g2", "Y2", prefix="bn2"),
    ]
    outputs = [io("Y1", dtype, [N, F]), io("Y2", dtype, [N, F])]
    original = make_model(nodes, [io("X", dtype, [N, K])], outputs, arrays)
    folded, report = fold_proto(original)
    assert [(r.node, r.rule, r.folded) for r in report.records] == [("bn1", "gemm", True), ("bn2", "gemm", True)]
    assert op_types(folded) == ["Gemm", "Gemm"]
    weights = [node.input[1] for node in folded.graph.node]
    assert len(set(weights)) == 2
    assert_equivalent(original, folded, dtype)


def test_folds_gemm_through_added_constant():
    dtype = np.float32
    rng = np.random.default_rng(5)
    arrays = {"B": rng.standard_normal((K, F)).astype(dtype), "c": rng.standard_normal((1, F)).astype(dtype)}
    arrays |= bn_arrays(F, dtype)
    nodes = [
        helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"),
        helper.make_node("Add", ["g", "c"], ["a"], name="add"),
        bn_node("a", "Y"),
    ]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "gemm")
    assert "through Add 'add'" in record.detail
    assert op_types(folded) == ["Gemm"]
    assert_equivalent(original, folded, dtype)


def test_skips_when_bn_follows_relu():
    dtype = np.float32
    arrays = {"B": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        bn_node("r", "Y"),
    ]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)
    assert (record.producer, record.rule) == ("Relu", None)
    assert op_types(folded) == ["Gemm", "Relu", "BatchNormalization"]


def test_skips_when_weight_not_constant():
    dtype = np.float32
    nodes = [helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"), bn_node("g", "Y")]
    inputs = [io("X", dtype, [N, K]), io("B", dtype, [K, F])]
    original = make_model(nodes, inputs, [io("Y", dtype, [N, F])], bn_arrays(F, dtype))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)
    assert op_types(folded) == ["Gemm", "BatchNormalization"]


def test_skips_when_bias_not_constant():
    dtype = np.float32
    nodes = [helper.make_node("Gemm", ["X", "B", "C"], ["g"], name="gemm", beta=2.0), bn_node("g", "Y")]
    inputs = [io("X", dtype, [N, K]), io("C", dtype, [F])]
    arrays = {"B": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    folded, report = fold_proto(make_model(nodes, inputs, [io("Y", dtype, [N, F])], arrays))
    assert_skipped(only_record(report), SkipReason.BIAS_NOT_CONSTANT)
    assert op_types(folded) == ["Gemm", "BatchNormalization"]


def test_skips_when_producer_output_shared():
    dtype = np.float32
    arrays = {"B": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [
        helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"),
        bn_node("g", "Y"),
        helper.make_node("Relu", ["g"], ["R"], name="relu"),
    ]
    outputs = [io("Y", dtype, [N, F]), io("R", dtype, [N, F])]
    folded, report = fold_proto(make_model(nodes, [io("X", dtype, [N, K])], outputs, arrays))
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_SHARED)
    assert op_types(folded) == ["Gemm", "BatchNormalization", "Relu"]


def test_skips_when_producer_output_is_graph_output():
    dtype = np.float32
    arrays = {"B": np.ones((K, F), dtype), **bn_arrays(F, dtype)}
    nodes = [helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"), bn_node("g", "Y")]
    outputs = [io("Y", dtype, [N, F]), io("g", dtype, [N, F])]
    _, report = fold_proto(make_model(nodes, [io("X", dtype, [N, K])], outputs, arrays))
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)


def test_skips_when_folded_weights_overflow_fp16():
    dtype = np.float16
    arrays = {"B": np.full((K, F), 60000, dtype), **bn_arrays(F, dtype)}
    arrays["bn_gamma"] = np.full(F, 4, dtype)
    nodes = [helper.make_node("Gemm", ["X", "B"], ["g"], name="gemm"), bn_node("g", "Y")]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.FOLDED_WEIGHTS_OVERFLOW)
    assert folded.graph.initializer[0] == original.graph.initializer[0]  # nothing written
    assert "beta" not in {a.name for a in folded.graph.node[0].attribute}


@pytest.mark.parametrize(("only", "skip"), [(None, ["gemm"]), (["conv", "matmul"], None)])
def test_skips_when_rule_disabled(only, skip):
    _, report = fold_proto(gemm_bn(), only=only, skip=skip)
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert "'gemm'" in record.detail


def test_only_gemm_folds_gemm():
    _, report = fold_proto(gemm_bn(), only=["gemm"])
    assert_folded(only_record(report), "gemm")


def test_rejects_unknown_rule_names():
    with pytest.raises(UsageError, match=r"unknown rule.*gem.*known rules: conv, conv_transpose, gemm"):
        bnfold.fold(gemm_bn(), only=["gem"])
    with pytest.raises(UsageError, match="unknown rule"):
        bnfold.fold(gemm_bn(), skip=["linear"])
