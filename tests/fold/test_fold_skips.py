"""Every precondition of the Conv/ConvTranspose fold: a named skip reason, and the model left untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_builders import ConvBN, op_types
from onnx import helper, numpy_helper

import bnfold
from bnfold.passes import SkipReason
from bnfold.report import FoldStatus


def graph_signature(model: onnx.ModelProto) -> tuple:
    """Nodes (op, inputs, outputs, attributes), initializer data, and graph inputs/outputs."""
    nodes = [
        (n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
        for n in model.graph.node
    ]
    tensors = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    return nodes, tensors, [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def fold_skipped(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, object]:
    """Fold, assert exactly one BN was skipped and the graph is unchanged; return (proto, record)."""
    before = graph_signature(model)
    folded, report = bnfold.fold(model, **options)
    proto = ir.to_proto(folded)
    assert len(report.records) == 1
    (record,) = report.records
    assert record.status is FoldStatus.SKIPPED
    assert record.detail
    assert report.nodes_after == report.nodes_before
    assert graph_signature(proto) == before
    assert "BatchNormalization" in op_types(proto)
    return proto, record


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))
    return model


def test_skips_when_training_mode_attribute_is_set():
    model = ConvBN(opset=15, bn_attributes={"training_mode": 1}).build()
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.TRAINING_MODE


@pytest.mark.parametrize(("opset", "outputs"), [(9, 5), (14, 3)])
def test_skips_when_training_outputs_are_present(opset, outputs):
    model = ConvBN(opset=opset).build()
    names = ["Y", "running_mean", "running_var", "saved_mean", "saved_var"][:outputs]
    model.graph.node[1].output[:] = names
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.TRAINING_MODE


@pytest.mark.parametrize("is_test", [None, 0])
def test_skips_when_opset6_is_test_is_zero(is_test):
    attributes = {} if is_test is None else {"is_test": is_test}
    model = ConvBN(opset=6, bn_attributes=attributes, ir_version=3).build()
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.TRAINING_MODE
    assert "is_test=0" in record.detail


def test_folds_opset6_with_is_test_one():
    model = ConvBN(opset=6, bn_attributes={"is_test": 1}, ir_version=3).build()
    _, report = bnfold.fold(model)
    assert report.records[0].status is FoldStatus.FOLDED


def test_skips_when_spatial_is_zero():
    model = ConvBN(opset=7, bn_attributes={"spatial": 0}).build()
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.SPATIAL_ZERO


def test_skips_when_producer_output_is_read_elsewhere():
    model = ConvBN().build()
    model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["side"], name="side_reader"))
    model.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, None))
    folded, report = bnfold.fold(model)
    (record,) = report.records
    assert record.reason is SkipReason.PRODUCER_OUTPUT_SHARED
    assert "BatchNormalization" in op_types(ir.to_proto(folded))


def test_skips_when_producer_output_is_a_graph_output():
    model = ConvBN().build()
    model.graph.output.append(helper.make_tensor_value_info("conv_out", onnx.TensorProto.FLOAT, None))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT


def _make_runtime_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    model.graph.initializer.remove(tensor)
    return model


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("W", SkipReason.WEIGHT_NOT_CONSTANT),
        ("B", SkipReason.BIAS_NOT_CONSTANT),
        ("mean", SkipReason.BN_PARAMS_NOT_CONSTANT),
        ("gamma", SkipReason.BN_PARAMS_NOT_CONSTANT),
    ],
)
def test_skips_when_a_tensor_is_a_runtime_input(name, reason):
    model = _make_runtime_input(ConvBN().build(), name)
    _, record = fold_skipped(model)
    assert record.reason is reason


def test_skips_when_weight_is_an_overridable_initializer_in_ir4_or_later():
    model = ConvBN(ir_version=8).build()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", weight.data_type, list(weight.dims)))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.WEIGHT_IS_GRAPH_INPUT


def test_skips_when_weight_is_computed_at_run_time():
    model = ConvBN().build()
    model.graph.node.insert(0, helper.make_node("Relu", ["W"], ["W_relu"], name="weight_relu"))
    model.graph.node[1].input[1] = "W_relu"
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.WEIGHT_NOT_CONSTANT


def test_skips_when_params_do_not_match_the_channel_count():
    spec = ConvBN(out_channels=6)
    model = spec.build()
    for name in ("gamma", "beta", "mean", "var"):
        replace_initializer(model, name, np.ones(3, np.float32))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.PARAM_SHAPE_MISMATCH


def test_skips_when_params_are_not_one_dimensional():
    model = replace_initializer(ConvBN().build(), "mean", np.zeros((6, 1), np.float32))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.PARAM_SHAPE_MISMATCH


def test_skips_when_fp16_folded_weight_would_overflow():
    spec = ConvBN(dtype=np.float16)
    model = spec.build()
    replace_initializer(model, "W", np.full(spec.weight_shape(), 60000, np.float16))
    replace_initializer(model, "gamma", np.full(6, 4, np.float16))  # scale ≈ 4/√var > 1
    replace_initializer(model, "var", np.full(6, 1, np.float16))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.FOLDED_WEIGHTS_OVERFLOW
    assert "65504" in record.detail


def test_skips_when_variance_is_negative():
    model = replace_initializer(ConvBN().build(), "var", np.full(6, -1.0, np.float32))
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.FOLDED_WEIGHTS_NOT_FINITE


def test_skips_when_there_is_no_producer():
    spec = ConvBN()
    model = spec.build()
    model.graph.node[1].input[0] = "X"
    del model.graph.node[0]
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 6
    _, record = fold_skipped(model)
    assert record.reason is SkipReason.NO_PRODUCER


def test_skips_when_an_activation_sits_between_conv_and_bn():
    model = ConvBN().build()
    model.graph.node.insert(1, helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"))
    model.graph.node[2].input[0] = "relu_out"
    folded, report = bnfold.fold(model)
    (record,) = report.records
    assert record.reason is SkipReason.UNSUPPORTED_PRODUCER
    assert record.producer == "Relu"
    assert op_types(ir.to_proto(folded)) == ["Conv", "Relu", "BatchNormalization"]


def test_skips_when_the_rule_is_disabled():
    _, record = fold_skipped(ConvBN().build(), skip=["conv"])
    assert record.reason is SkipReason.RULE_DISABLED
    _, record = fold_skipped(ConvBN(transpose=True).build(), only=["conv"])
    assert record.reason is SkipReason.RULE_DISABLED


def test_unknown_rule_names_are_a_usage_error():
    with pytest.raises(bnfold.errors.UsageError, match="unknown rule"):
        bnfold.fold(ConvBN().build(), only=["no_such_rule"])


def test_skip_reasons_are_upper_snake_and_unique():
    values = [reason.value for reason in SkipReason]
    assert len(values) == len(set(values))
    assert all(value == reason.name and value.isupper() for value, reason in zip(values, SkipReason, strict=True))
