"""Conv and ConvTranspose folds: positive cases over rank, group, bias, attributes and dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_builders import ConvBN, assert_equivalent, op_types

import bnfold
from bnfold.report import FoldStatus


def fold_proto(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, bnfold.FoldReport]:
    folded, report = bnfold.fold(model, **options)
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    return proto, report


def assert_single_fold(report, rule: str) -> None:
    assert len(report.records) == 1
    (record,) = report.records
    assert record.status is FoldStatus.FOLDED, record
    assert record.reason is None
    assert record.rule == rule
    assert record.output == "Y"
    assert report.nodes_before == 2 and report.nodes_after == 1


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(
    ("group", "in_channels", "out_channels"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4)],
    ids=["group1", "grouped", "depthwise"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv(rank, group, in_channels, out_channels, bias):
    spec = ConvBN(rank=rank, group=group, in_channels=in_channels, out_channels=out_channels, bias=bias)
    original = spec.build()
    folded, report = fold_proto(original)
    assert_single_fold(report, "conv")
    assert op_types(folded) == ["Conv"]
    assert len(folded.graph.node[0].input) == 3  # a bias was created when missing
    assert_equivalent(original, folded)


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
    spec = ConvBN(conv_attributes=attributes, spatial_size=9)
    original = spec.build()
    folded, report = fold_proto(original)
    assert_single_fold(report, "conv")
    assert_equivalent(original, folded)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(
    ("group", "in_channels", "out_channels"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4), (2, 6, 4)],
    ids=["group1", "grouped", "depthwise", "grouped_narrowing"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folds_conv_transpose(rank, group, in_channels, out_channels, bias):
    spec = ConvBN(rank=rank, group=group, in_channels=in_channels, out_channels=out_channels, bias=bias, transpose=True)
    original = spec.build()
    folded, report = fold_proto(original)
    assert_single_fold(report, "conv_transpose")
    assert op_types(folded) == ["ConvTranspose"]
    assert_equivalent(original, folded)


@pytest.mark.parametrize(
    "attributes",
    [{"strides": [2, 2], "output_padding": [1, 0]}, {"dilations": [2, 1], "pads": [1, 1, 0, 0]}],
    ids=["strides_output_padding", "dilations_pads"],
)
def test_folds_conv_transpose_with_any_geometry(attributes):
    spec = ConvBN(transpose=True, group=2, conv_attributes=attributes)
    original = spec.build()
    folded, report = fold_proto(original)
    assert_single_fold(report, "conv_transpose")
    assert_equivalent(original, folded)


def test_folds_grouped_conv_transpose_weight_layout_exactly():
    """W[C_in, C_out/g, k]: element (i, j) belongs to output channel (i // (C_in/g)) * (C_out/g) + j."""
    spec = ConvBN(transpose=True, group=2, in_channels=4, out_channels=6, rank=1, bias=False, dtype=np.float64)
    arrays = spec.arrays()
    folded, _ = fold_proto(spec.build())
    weight = onnx.numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "W"))
    scale = arrays["gamma"] / np.sqrt(arrays["var"] + np.float64(np.float32(1e-5)))
    for i in range(4):
        for j in range(3):
            channel = (i // 2) * 3 + j
            np.testing.assert_allclose(weight[i, j], arrays["W"][i, j] * scale[channel], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
def test_folds_in_every_runnable_dtype(dtype, transpose):
    spec = ConvBN(dtype=dtype, transpose=transpose)
    original = spec.build()
    folded, report = fold_proto(original)
    assert_single_fold(report, "conv_transpose" if transpose else "conv")
    weight = next(i for i in folded.graph.initializer if i.name == "W")
    assert weight.data_type == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert_equivalent(original, folded, dtype=dtype)


def test_folds_bfloat16_with_float64_math_and_one_cast():
    spec = ConvBN(dtype=ml_dtypes.bfloat16, opset=22)  # Conv accepts bf16 from opset 22
    arrays = spec.arrays()
    folded, report = fold_proto(spec.build())
    assert_single_fold(report, "conv")
    initializers = {i.name: i for i in folded.graph.initializer}
    weight = onnx.numpy_helper.to_array(initializers["W"])
    bias = onnx.numpy_helper.to_array(initializers["B"])
    assert weight.dtype == ml_dtypes.bfloat16
    as64 = {name: array.astype(np.float64) for name, array in arrays.items()}
    scale = as64["gamma"] / np.sqrt(as64["var"] + np.float64(np.float32(1e-5)))
    expected_w = (as64["W"] * scale[:, None, None, None]).astype(ml_dtypes.bfloat16)
    expected_b = ((as64["B"] - as64["mean"]) * scale + as64["beta"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(weight, expected_w)
    np.testing.assert_array_equal(bias, expected_b)


def test_folds_opset15_fp16_weights_with_fp32_statistics_type_valid():
    spec = ConvBN(dtype=np.float16, stats_dtype=np.float32, opset=15)
    original = spec.build()
    folded, report = fold_proto(original)  # full_check=True type-checks the result
    assert_single_fold(report, "conv")
    types = {i.name: i.data_type for i in folded.graph.initializer}
    assert types["W"] == types["B"] == onnx.TensorProto.FLOAT16
    assert_equivalent(original, folded, dtype=np.float16)


def test_fp16_fold_with_subnormal_variance_beats_a_step_by_step_fp16_fold():
    """var + ε is subnormal in fp16: float64 math with one cast stays closer to the exact result."""
    spec = ConvBN(dtype=np.float16, bias=True, bn_attributes={"epsilon": 1e-7})
    arrays = spec.arrays()
    arrays["var"] = np.full(spec.out_channels, 3e-6, np.float16)  # subnormal in fp16 (< 6.1e-5)
    arrays["gamma"] = np.full(spec.out_channels, 1e-3, np.float16)
    assert np.all(np.abs(arrays["var"]) < np.finfo(np.float16).tiny)
    model = spec.build()
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in arrays.items())
    folded, report = fold_proto(model)
    assert_single_fold(report, "conv")
    weight = onnx.numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "W"))

    as64 = {name: array.astype(np.float64) for name, array in arrays.items()}
    exact_scale = as64["gamma"] / np.sqrt(as64["var"] + np.float64(np.float32(1e-7)))
    exact = as64["W"] * exact_scale[:, None, None, None]
    h = {name: array.astype(np.float16) for name, array in arrays.items()}
    step_scale = h["gamma"] / np.sqrt(h["var"] + np.float16(1e-7))
    step_by_step = h["W"] * step_scale[:, None, None, None].astype(np.float16)

    ours = np.max(np.abs(weight.astype(np.float64) - exact))
    theirs = np.max(np.abs(step_by_step.astype(np.float64) - exact))
    assert ours < theirs
    # one rounding to fp16: at most half an ulp of the result
    assert np.all(np.abs(weight.astype(np.float64) - exact) <= np.abs(exact) * 2.0**-11 + 2.0**-25)


def test_folds_chain_of_two_batch_norms_into_one_conv():
    spec = ConvBN()
    model = spec.build()
    model.graph.node[1].output[0] = "mid"
    model.graph.node.append(
        onnx.helper.make_node("BatchNormalization", ["mid", "gamma", "beta", "mean", "var"], ["Y"], name="bn2")
    )
    folded, report = fold_proto(model)
    assert [r.status for r in report.records] == [FoldStatus.FOLDED, FoldStatus.FOLDED]
    assert op_types(folded) == ["Conv"]
    assert_equivalent(model, folded)


def test_keeps_names_outputs_metadata_and_opsets():
    spec = ConvBN()
    model = spec.build()
    model.producer_name = "unit-test"
    onnx.helper.set_model_props(model, {"author": "bnfold tests"})
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    folded, _ = fold_proto(model)
    assert folded.producer_name == "unit-test"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "bnfold tests"}
    assert {(o.domain, o.version) for o in folded.opset_import} == {("", 17), ("com.example", 1)}
    assert folded.graph.node[0].name == "conv"
    assert [o.name for o in folded.graph.output] == ["Y"]
    assert folded.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [i.name for i in folded.graph.input] == ["X"]
    assert sorted(i.name for i in folded.graph.initializer) == ["B", "W"]


def test_scale_range_is_reported():
    spec = ConvBN(dtype=np.float64)
    arrays = spec.arrays()
    _, report = fold_proto(spec.build())
    scale = arrays["gamma"] / np.sqrt(arrays["var"] + np.float64(np.float32(1e-5)))
    (record,) = report.records
    assert record.scale_min == pytest.approx(scale.min(), rel=1e-15)
    assert record.scale_max == pytest.approx(scale.max(), rel=1e-15)
