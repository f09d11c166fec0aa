"""BatchNormalization → Conv without padding: the forward fold into the following Conv."""

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

from bnfold.passes import SkipReason

CONV_DTYPES = [np.float32, np.float16, np.float64]  # ONNX Conv has no bf16 type
CONV_DTYPE_IDS = ["fp32", "fp16", "fp64"]
SIZE = 7


def bn_conv(
    *,
    in_channels: int = 4,
    out_channels: int = 6,
    group: int = 1,
    kernel: int = 1,
    bias: bool = True,
    dtype=np.float32,
    conv_attributes: dict | None = None,
    before: str | None = None,
    seed: int = 0,
):
    """``[before →] BN → Conv``; ``before`` is an op type placed between the input and the BN (e.g. Relu)."""
    rng = np.random.default_rng(seed)
    weight_shape = (out_channels, in_channels // group, kernel, kernel)
    arrays = {"W": (rng.standard_normal(weight_shape) * 0.3).astype(dtype), **bn_arrays(in_channels, dtype, seed=seed)}
    inputs = ["bn_out", "W"]
    if bias:
        arrays["B"] = rng.standard_normal(out_channels).astype(dtype)
        inputs.append("B")
    nodes = []
    bn_input = "X"
    if before is not None:
        nodes.append(helper.make_node(before, ["X"], ["pre"], name="pre"))
        bn_input = "pre"
    nodes.append(bn_node(bn_input, "bn_out"))
    attributes = {"group": group, **(conv_attributes or {})}
    nodes.append(helper.make_node("Conv", inputs, ["Y"], name="conv", **attributes))
    x = io("X", dtype, [2, in_channels, SIZE, SIZE])
    return make_model(nodes, [x], [io("Y", dtype, [2, out_channels, None, None])], arrays)


def assert_forward_fold(original, dtype=np.float32):
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "forward_conv")
    assert (record.producer, record.producer_node) == ("Conv", "conv")
    assert record.output == "Y"  # BN's own output is gone; the Conv's output is the comparable tensor
    assert "folded consuming Conv 'conv'" in record.detail
    assert op_types(folded)[-1] == "Conv" and "BatchNormalization" not in op_types(folded)
    assert report.nodes_after == report.nodes_before - 1
    conv = folded.graph.node[-1]
    assert len(conv.input) == 3
    assert_equivalent(original, folded, dtype)
    return folded


@pytest.mark.parametrize(
    ("group", "in_channels", "out_channels"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
    ids=["group1", "grouped", "depthwise", "depthwise_x2"],
)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_bn_into_following_conv(group, in_channels, out_channels, kernel, bias):
    original = bn_conv(in_channels=in_channels, out_channels=out_channels, group=group, kernel=kernel, bias=bias)
    assert_forward_fold(original)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
def test_folds_bn_into_following_conv_in_every_dtype(dtype):
    assert_forward_fold(bn_conv(dtype=dtype, kernel=3, group=2), dtype)


@pytest.mark.parametrize(
    "attributes",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 1]},
        {"pads": [0, 0, 0, 0]},
        {"auto_pad": "VALID", "strides": [2, 1]},
    ],
    ids=["strides", "dilations", "zero_pads", "valid"],
)
def test_folds_bn_into_pad_free_conv_attributes(attributes):
    assert_forward_fold(bn_conv(kernel=3, conv_attributes=attributes))


def test_folds_bn_into_same_padded_1x1_conv_which_never_pads():
    assert_forward_fold(bn_conv(kernel=1, conv_attributes={"auto_pad": "SAME_UPPER", "strides": [2, 2]}))


def test_folds_bn_after_relu_forward_into_conv():
    """Relu → BN → Conv: BN is not moved across the Relu, it moves into the Conv after it."""
    folded = assert_forward_fold(bn_conv(before="Relu", kernel=3))
    assert op_types(folded) == ["Relu", "Conv"]


@pytest.mark.parametrize(
    "attributes",
    [{"pads": [1, 1, 1, 1]}, {"pads": [0, 0, 1, 0]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}],
    ids=["pads", "one_side", "same_upper", "same_lower"],
)
def test_skips_when_conv_has_padding(attributes):
    original = bn_conv(kernel=3, conv_attributes=attributes)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.CONV_HAS_PADDING)
    assert (record.producer, record.rule, record.output) == ("Conv", "forward_conv", "bn_out")
    assert op_types(folded) == ["BatchNormalization", "Conv"]


def test_skips_when_bn_follows_relu_in_front_of_padded_conv():
    original = bn_conv(before="Relu", kernel=3, conv_attributes={"pads": [1, 1, 1, 1]})
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.CONV_HAS_PADDING)
    assert op_types(folded) == ["Relu", "BatchNormalization", "Conv"]


def test_skips_when_bn_output_has_two_readers():
    original = bn_conv()
    original.graph.node.append(helper.make_node("Relu", ["bn_out"], ["R"], name="relu"))
    original.graph.output.append(io("R", np.float32, [2, 4, SIZE, SIZE]))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.NO_PRODUCER)  # no forward candidate: the backward reason stands
    assert record.producer is None
    assert op_types(folded) == ["BatchNormalization", "Conv", "Relu"]


def test_skips_when_forward_rule_disabled():
    _, report = fold_proto(bn_conv(), skip=["forward_conv"])
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert "'forward_conv'" in record.detail


def test_skips_when_following_conv_weight_not_constant():
    original = bn_conv()
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "W"))
    original.graph.input.append(io("W", np.float32, [6, 4, 1, 1]))
    _, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)


def test_folds_forward_when_backward_fold_is_impossible():
    """Conv(runtime W) → BN → Conv 1x1: the backward fold fails, the forward one succeeds."""
    dtype = np.float32
    rng = np.random.default_rng(8)
    arrays = {"W2": rng.standard_normal((5, 6, 1, 1)).astype(dtype), **bn_arrays(6, dtype)}
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "bn_out"),
        helper.make_node("Conv", ["bn_out", "W2"], ["Y"], name="conv2"),
    ]
    inputs = [io("X", dtype, [1, 3, SIZE, SIZE]), io("W1", dtype, [6, 3, 3, 3])]
    original = make_model(nodes, inputs, [io("Y", dtype, [1, 5, SIZE, SIZE])], arrays)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "forward_conv")
    assert record.producer_node == "conv2"
    assert op_types(folded) == ["Conv", "Conv"]
    assert_equivalent(original, folded, dtype)


def test_folds_backward_and_forward_around_one_conv():
    """BN_a → Conv 1x1 → BN_b: BN_a folds forward, BN_b backward, into the same Conv."""
    original = bn_conv()
    original.graph.node[-1].output[0] = "conv_out"
    original.graph.node.append(bn_node("conv_out", "Y", prefix="bn2"))
    original.graph.initializer.extend(
        helper.make_tensor(name, 1, a.shape, a.tolist()) for name, a in bn_arrays(6, np.float32, "bn2", 4).items()
    )
    folded, report = fold_proto(original)
    assert [(r.node, r.rule, r.folded) for r in report.records] == [("bn", "forward_conv", True), ("bn2", "conv", True)]
    assert op_types(folded) == ["Conv"]
    assert_equivalent(original, folded, np.float32)
