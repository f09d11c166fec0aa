"""Conv → BatchNormalization folded into the Conv (rule ``conv``, ``passes/conv.py``).

The template for a rule's tests (copy it when adding a rule): one builder that states the graph, positive cases
parametrised over bias, group, rank and dtype (node counts, the record, the ONNX checker, numerics against the
original on onnxruntime with optimisations off — :mod:`tests.oracle`), and one negative case per precondition
in the rule's docstring, asserting its exact :class:`~bnfold.passes.SkipReason` and that the model is untouched.
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

CONV_DTYPES = [np.float32, np.float16, np.float64]  # ONNX Conv has no bf16 type (before opset 22)
CONV_DTYPE_IDS = ["fp32", "fp16", "fp64"]
SIZE = 6


def conv_bn(
    *,
    rank: int = 2,
    in_channels: int = 4,
    out_channels: int = 6,
    group: int = 1,
    kernel: int = 3,
    conv_attributes: dict | None = None,
    **options,
) -> onnx.ModelProto:
    """``X → Conv(W[, B]) → BN → Y`` (W is ``[M, C/group, k...]``); see :func:`rules_helpers.layer_bn_model`."""
    return layer_bn_model(
        "Conv",
        (out_channels, in_channels // group) + (kernel,) * rank,
        name="conv",
        in_channels=in_channels,
        out_channels=out_channels,
        size=SIZE,
        group=group,
        attributes=conv_attributes,
        **options,
    )


def assert_conv_fold(original: onnx.ModelProto, dtype=np.float32) -> onnx.ModelProto:
    folded, report = fold_proto(original)  # (runs onnx.checker with full_check on the result)
    record = only_record(report)
    assert_folded(record, "conv")
    assert (record.producer, record.producer_node, record.output) == ("Conv", "conv", "Y")
    assert record.detail == "folded into Conv 'conv'"
    assert op_types(folded) == ["Conv"]
    assert (report.nodes_before, report.nodes_after) == (2, 1)
    assert len(folded.graph.node[0].input) == 3  # a bias is created when the Conv had none
    assert_equivalent(original, folded, dtype)
    return folded


def assert_untouched(original: onnx.ModelProto, reason: SkipReason, detail: str | None = None) -> None:
    folded, report = bnfold.fold(original)
    record = only_record(report)
    assert_skipped(record, reason)
    assert record.rule == "conv"
    if detail is not None:
        assert record.detail == detail
    assert [node.op_type for node in folded.graph] == ["Conv", "BatchNormalization"]
    assert report.nodes_after == report.nodes_before == 2


# -- positive ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize(
    ("group", "in_channels", "out_channels"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
    ids=["group1", "grouped", "depthwise", "depthwise_x2"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv(rank, group, in_channels, out_channels, bias):
    assert_conv_fold(conv_bn(rank=rank, group=group, in_channels=in_channels, out_channels=out_channels, bias=bias))


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv_in_every_dtype(dtype, bias):
    folded = assert_conv_fold(conv_bn(dtype=dtype, group=2, bias=bias), dtype)
    weights = {init.name: init for init in folded.graph.initializer}
    assert {weights[name].data_type for name in folded.graph.node[0].input[1:]} == {
        helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    }


@pytest.mark.parametrize(
    "attributes",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"pads": [1, 0, 2, 1]},
        {"auto_pad": "SAME_UPPER"},
        {"auto_pad": "VALID", "strides": [2, 1]},
    ],
    ids=["strides", "dilations", "asymmetric_pads", "same_upper", "valid"],
)
def test_folds_conv_with_any_geometry(attributes):
    assert_conv_fold(conv_bn(conv_attributes=attributes))


def test_folds_conv_weight_exactly_in_float64():
    """``W' = W·s`` and ``b' = b·s + t`` in float64, one cast: the folded fp64 tensors equal the formula."""
    original = conv_bn(dtype=np.float64, group=2)
    folded, _ = fold_proto(original)
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in original.graph.initializer}
    epsilon = np.float64(np.float32(1e-5))  # the default float32 attribute, widened exactly
    scale = arrays["bn_gamma"] / np.sqrt(arrays["bn_var"] + epsilon)
    shift = arrays["bn_beta"] - arrays["bn_mean"] * scale
    result = {init.name: onnx.numpy_helper.to_array(init) for init in folded.graph.initializer}
    weight_name, bias_name = folded.graph.node[0].input[1:]
    np.testing.assert_array_equal(result[weight_name], arrays["W"] * scale.reshape(-1, 1, 1, 1))
    np.testing.assert_array_equal(result[bias_name], arrays["B"] * scale + shift)


# -- negative: one per precondition of passes/conv.py ---------------------------------------------------------


def test_skips_when_weight_not_constant():
    assert_untouched(conv_bn(runtime=("W",)), SkipReason.WEIGHT_NOT_CONSTANT, "input 1 ('W') of Conv is not constant")


def test_skips_when_bias_not_constant():
    assert_untouched(conv_bn(runtime=("B",)), SkipReason.BIAS_NOT_CONSTANT, "input 2 ('B') of Conv is not constant")


def test_skips_when_weight_dtype_is_not_float():
    weight = np.ones((6, 4, 3, 3), dtype=np.int8)
    assert_untouched(conv_bn(weight=weight, check=False), SkipReason.UNSUPPORTED_DTYPE, "weight 'W' is INT8")


def test_skips_when_weight_rank_below_three():
    weight = np.ones((6, 4), dtype=np.float32)
    detail = "Conv weight has rank 2, expected >= 3"
    assert_untouched(conv_bn(weight=weight, check=False), SkipReason.UNSUPPORTED_LAYOUT, detail)


def test_skips_when_bias_is_not_one_value_per_channel():
    bias = np.ones(1, dtype=np.float32)
    detail = "bias shape (1,) is not (6,)"
    assert_untouched(conv_bn(bias_values=bias, check=False), SkipReason.UNSUPPORTED_LAYOUT, detail)


def test_skips_when_bn_channels_differ_from_conv_outputs():
    detail = "BN has 5 channels, Conv 'conv' outputs 6"
    assert_untouched(conv_bn(bn_channels=5, check=False), SkipReason.PARAM_SHAPE_MISMATCH, detail)


def test_skips_when_rule_disabled():
    folded, report = fold_proto(conv_bn(), skip=["conv"])
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert record.detail == "rule 'conv' is disabled"
    assert op_types(folded) == ["Conv", "BatchNormalization"]
