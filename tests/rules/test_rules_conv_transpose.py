"""ConvTranspose → BatchNormalization folded into the ConvTranspose (rule ``conv_transpose``).

Same layout as ``test_rules_conv.py``: a builder, positive cases over bias, group, rank, dtype and geometry
(node counts, record, checker, numerics on onnxruntime with optimisations off), then one negative case per
precondition of ``passes/conv_transpose.py`` with its exact reason and detail.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from rules_helpers import (
    assert_equivalent,
    assert_folded,
    assert_skipped,
    fold_proto,
    layer_bn_model,
    only_record,
    op_types,
)

import bnfold
from bnfold.passes import SkipReason

CONV_DTYPES = [np.float32, np.float16, np.float64]  # ONNX ConvTranspose has no bf16 type (before opset 22)
CONV_DTYPE_IDS = ["fp32", "fp16", "fp64"]
SIZE = 5


def conv_transpose_bn(
    *,
    rank: int = 2,
    in_channels: int = 4,
    out_channels: int = 6,
    group: int = 1,
    kernel: int = 3,
    attributes: dict | None = None,
    **options,
) -> onnx.ModelProto:
    """``X → ConvTranspose(W[, B]) → BN → Y``; W is ``[C_in, C_out/group, k...]`` (see
    :func:`rules_helpers.layer_bn_model`)."""
    return layer_bn_model(
        "ConvTranspose",
        (in_channels, out_channels // group) + (kernel,) * rank,
        name="ct",
        in_channels=in_channels,
        out_channels=out_channels,
        size=SIZE,
        group=group,
        attributes=attributes,
        **options,
    )


def assert_conv_transpose_fold(original: onnx.ModelProto, dtype=np.float32) -> onnx.ModelProto:
    folded, report = fold_proto(original)  # (runs onnx.checker with full_check on the result)
    record = only_record(report)
    assert_folded(record, "conv_transpose")
    assert (record.producer, record.producer_node, record.output) == ("ConvTranspose", "ct", "Y")
    assert record.detail == "folded into ConvTranspose 'ct'"
    assert op_types(folded) == ["ConvTranspose"]
    assert (report.nodes_before, report.nodes_after) == (2, 1)
    assert len(folded.graph.node[0].input) == 3  # a bias is created when there was none
    assert_equivalent(original, folded, dtype)
    return folded


def assert_untouched(original: onnx.ModelProto, reason: SkipReason, detail: str) -> None:
    folded, report = bnfold.fold(original)
    record = only_record(report)
    assert_skipped(record, reason)
    assert record.rule == "conv_transpose"
    assert record.detail == detail
    assert [node.op_type for node in folded.graph] == ["ConvTranspose", "BatchNormalization"]
    assert report.nodes_after == report.nodes_before == 2


# -- positive ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize(
    ("group", "in_channels", "out_channels"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4), (2, 6, 4)],
    ids=["group1", "grouped", "depthwise", "grouped_narrowing"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv_transpose(rank, group, in_channels, out_channels, bias):
    original = conv_transpose_bn(rank=rank, group=group, in_channels=in_channels, out_channels=out_channels, bias=bias)
    assert_conv_transpose_fold(original)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv_transpose_in_every_dtype(dtype, bias):
    # group 1: fp64 runs on onnx's reference evaluator (no CPU kernel), whose grouped ConvTranspose fails
    folded = assert_conv_transpose_fold(conv_transpose_bn(dtype=dtype, bias=bias), dtype)
    weights = {init.name: init for init in folded.graph.initializer}
    assert {weights[name].data_type for name in folded.graph.node[0].input[1:]} == {
        helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    }


@pytest.mark.parametrize(
    "attributes",
    [
        {"strides": [2, 2], "output_padding": [1, 0]},
        {"dilations": [2, 1], "pads": [1, 1, 0, 0]},
        {"strides": [2, 2], "output_shape": [11, 10]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ],
    ids=["strides_output_padding", "dilations_pads", "output_shape", "same_upper"],
)
def test_folds_conv_transpose_with_any_geometry(attributes):
    assert_conv_transpose_fold(conv_transpose_bn(group=2, attributes=attributes))


def test_folds_grouped_conv_transpose_weight_exactly_in_float64():
    """``W'[g, i, j] = W[g, i, j] · s[g, j]``: element ``W[i, j]`` of group ``g`` feeds output ``g·(C_out/g) + j``."""
    original = conv_transpose_bn(rank=1, group=2, in_channels=4, out_channels=6, dtype=np.float64)
    folded, _ = fold_proto(original)
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in original.graph.initializer}
    epsilon = np.float64(np.float32(1e-5))  # the default float32 attribute, widened exactly
    scale = arrays["bn_gamma"] / np.sqrt(arrays["bn_var"] + epsilon)
    shift = arrays["bn_beta"] - arrays["bn_mean"] * scale
    expected = arrays["W"].copy()
    for i in range(4):
        for j in range(3):
            expected[i, j] *= scale[(i // 2) * 3 + j]
    result = {init.name: onnx.numpy_helper.to_array(init) for init in folded.graph.initializer}
    weight_name, bias_name = folded.graph.node[0].input[1:]
    np.testing.assert_array_equal(result[weight_name], expected)
    np.testing.assert_array_equal(result[bias_name], arrays["B"] * scale + shift)


# -- negative: one per precondition of passes/conv_transpose.py -----------------------------------------------


def test_skips_when_weight_not_constant():
    detail = "input 1 ('W') of ConvTranspose is not constant"
    assert_untouched(conv_transpose_bn(runtime=("W",)), SkipReason.WEIGHT_NOT_CONSTANT, detail)


def test_skips_when_bias_not_constant():
    detail = "input 2 ('B') of ConvTranspose is not constant"
    assert_untouched(conv_transpose_bn(runtime=("B",)), SkipReason.BIAS_NOT_CONSTANT, detail)


def test_skips_when_weight_dtype_is_not_float():
    weight = np.ones((4, 6, 3, 3), dtype=np.int32)
    original = conv_transpose_bn(weight=weight, check=False)
    assert_untouched(original, SkipReason.UNSUPPORTED_DTYPE, "weight 'W' is INT32")


def test_skips_when_input_channels_do_not_split_into_groups():
    weight = np.ones((4, 3, 3, 3), dtype=np.float32)
    original = conv_transpose_bn(weight=weight, group=3, out_channels=9, check=False)
    detail = "ConvTranspose weight (4, 3, 3, 3) does not split into group=3"
    assert_untouched(original, SkipReason.UNSUPPORTED_LAYOUT, detail)


def test_skips_when_weight_rank_below_three():
    original = conv_transpose_bn(weight=np.ones((4, 6), dtype=np.float32), check=False)
    assert_untouched(original, SkipReason.UNSUPPORTED_LAYOUT, "ConvTranspose weight (4, 6) does not split into group=1")


def test_skips_when_bias_is_not_one_value_per_channel():
    original = conv_transpose_bn(bias_values=np.ones(2, dtype=np.float32), check=False)
    assert_untouched(original, SkipReason.UNSUPPORTED_LAYOUT, "bias shape (2,) is not (6,)")


def test_skips_when_bn_channels_differ_from_group_times_weight_columns():
    original = conv_transpose_bn(group=2, bn_channels=3, check=False)  # C_out = 2 · 3 = 6
    assert_untouched(original, SkipReason.PARAM_SHAPE_MISMATCH, "BN has 3 channels, ConvTranspose 'ct' outputs 6")


def test_skips_when_rule_disabled():
    folded, report = fold_proto(conv_transpose_bn(), skip=["conv_transpose"])
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert record.detail == "rule 'conv_transpose' is disabled"
    assert op_types(folded) == ["ConvTranspose", "BatchNormalization"]
