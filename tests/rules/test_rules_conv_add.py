"""Conv/ConvTranspose → Add(constant per-channel bias) → BatchNormalization, and Conv → BN → BN chains."""

from __future__ import annotations

import numpy as np
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

from bnfold.passes import Skip, SkipReason
from bnfold.passes.through_add import per_channel_vector

CONV_DTYPES = [np.float32, np.float16, np.float64]  # ONNX Conv has no bf16 type
CONV_DTYPE_IDS = ["fp32", "fp16", "fp64"]
C_IN, C_OUT, SIZE = 4, 6, 6


def conv_add_bn(
    *,
    add_shape: tuple[int, ...] | None,
    transpose: bool = False,
    group: int = 1,
    bias: bool = True,
    dtype=np.float32,
    seed: int = 0,
):
    rng = np.random.default_rng(seed)
    weight_shape = (C_IN, C_OUT // group, 3, 3) if transpose else (C_OUT, C_IN // group, 3, 3)
    arrays = {"W": (rng.standard_normal(weight_shape) * 0.3).astype(dtype), **bn_arrays(C_OUT, dtype, seed=seed)}
    inputs = ["X", "W"]
    if bias:
        arrays["B"] = rng.standard_normal(C_OUT).astype(dtype)
        inputs.append("B")
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(op, inputs, ["conv_out"], name="conv", group=group, pads=[1, 1, 1, 1])]
    bn_input = "conv_out"
    if add_shape is not None:
        arrays["c"] = rng.standard_normal(add_shape).astype(dtype)
        nodes.append(helper.make_node("Add", ["conv_out", "c"], ["a"], name="add"))
        bn_input = "a"
    nodes.append(bn_node(bn_input, "Y"))
    x = io("X", dtype, [2, C_IN, SIZE, SIZE])
    return make_model(nodes, [x], [io("Y", dtype, [2, C_OUT, SIZE, SIZE])], arrays)


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("add_shape", [(C_OUT, 1, 1), (1, C_OUT, 1, 1), (), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("group", [1, 2], ids=["group1", "group2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv_through_added_bias(transpose, add_shape, group, bias):
    original = conv_add_bn(add_shape=add_shape, transpose=transpose, group=group, bias=bias)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "conv_transpose" if transpose else "conv")
    assert "through Add 'add'" in record.detail
    assert (report.nodes_before, report.nodes_after) == (3, 1)
    assert op_types(folded) == ["ConvTranspose" if transpose else "Conv"]
    assert len(folded.graph.node[0].input) == 3
    assert folded.graph.node[0].output[0] == "Y"
    assert {i.name for i in folded.graph.initializer} == ({"W", "B"} if bias else {"W", "W_bias"})
    assert_equivalent(original, folded, np.float32)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
def test_folds_conv_through_added_bias_in_every_dtype(dtype):
    original = conv_add_bn(add_shape=(1, C_OUT, 1, 1), dtype=dtype)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert_equivalent(original, folded, dtype)


def test_skips_when_added_constant_not_per_channel():
    """[C] on a 4-D output broadcasts along the width (SIZE == C_OUT keeps the model valid)."""
    original = conv_add_bn(add_shape=(C_OUT,))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL)
    assert (record.producer, record.rule) == ("Conv", "conv")
    assert op_types(folded) == ["Conv", "Add", "BatchNormalization"]


@pytest.mark.parametrize(
    ("shape", "rank", "reason"),
    [
        ((1, 1, C_OUT, 1, 1), 4, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL),  # widens the output
        ((C_OUT, 2, 1), 4, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL),  # varies along the height
        ((2, 1, 1, 1), 4, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL),  # varies along the batch
        ((1, 3, 1, 1), 4, SkipReason.PARAM_SHAPE_MISMATCH),  # 3 channels for a 6-channel BN
        ((C_OUT,), 1, SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL),  # no channel axis at rank 1
    ],
    ids=["widens", "height", "batch", "channels", "rank1"],
)
def test_skips_when_added_constant_shape_is_not_a_channel_vector(shape, rank, reason):
    with pytest.raises(Skip) as raised:
        per_channel_vector(np.ones(shape), rank, C_OUT)
    assert raised.value.reason is reason


@pytest.mark.parametrize(
    ("shape", "rank"), [((C_OUT, 1, 1), 4), ((1, C_OUT, 1), 3), ((C_OUT,), 2), ((1, 1), 2), ((), 5)], ids=str
)
def test_folds_added_constant_of_channel_vector_shape(shape, rank):
    constant = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1
    vector = per_channel_vector(constant, rank, C_OUT)
    assert vector.dtype == np.float64 and vector.shape == (C_OUT,)
    aligned = constant.reshape((1,) * (rank - constant.ndim) + shape)
    np.testing.assert_array_equal(np.broadcast_to(aligned, (1, C_OUT) + (1,) * (rank - 2)).reshape(-1), vector)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
@pytest.mark.parametrize("with_add", [False, True], ids=["direct", "through_add"])
def test_folds_conv_bn_bn_chain(dtype, with_add):
    original = conv_add_bn(add_shape=(C_OUT, 1, 1) if with_add else None, dtype=dtype)
    original.graph.node[-1].output[0] = "mid"
    original.graph.node.append(bn_node("mid", "Y", prefix="bn2"))
    original.graph.initializer.extend(
        helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), a.shape, a.flatten().tolist())
        for name, a in bn_arrays(C_OUT, dtype, "bn2", 5).items()
    )
    folded, report = fold_proto(original)
    assert [(r.node, r.rule, r.folded) for r in report.records] == [("bn", "conv", True), ("bn2", "conv", True)]
    assert op_types(folded) == ["Conv"]
    assert_equivalent(original, folded, dtype)


def test_skips_when_bn_follows_relu():
    original = conv_add_bn(add_shape=None)
    relu = helper.make_node("Relu", ["conv_out"], ["r"], name="relu")
    original.graph.node.insert(1, relu)
    original.graph.node[2].input[0] = "r"
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)
    assert record.producer == "Relu"
    assert op_types(folded) == ["Conv", "Relu", "BatchNormalization"]
