"""Node semantics of BatchNormalization-1/6/7/9/14/15 and the by-the-book node evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper as oh
from training_builders import BFLOAT16, bn_inputs, bn_model

from bnfold.errors import InvalidModelError, UsageError
from bnfold.training import (
    batch_norm_forward,
    evaluate_batch_norm_node,
    node_semantics,
    resolve_semantics,
    schema_version,
)

FLOAT32_EPSILON = float(np.float32(1e-5))
FLOAT32_MOMENTUM = float(np.float32(0.9))


def _node(outputs, **attributes) -> onnx.NodeProto:
    return oh.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], outputs, name="bn", **attributes)


@pytest.mark.parametrize(
    ("opset", "version"), [(1, 1), (5, 1), (6, 6), (7, 7), (8, 7), (9, 9), (13, 9), (14, 14), (15, 15), (22, 15)]
)
def test_schema_version_per_opset(opset: int, version: int) -> None:
    assert schema_version(opset) == version


@pytest.mark.parametrize(
    ("opset", "outputs", "attributes", "training"),
    [
        (1, 1, {"is_test": 1, "consumed_inputs": [0, 0, 0, 1, 1]}, False),
        (1, 5, {"consumed_inputs": [0, 0, 0, 1, 1]}, True),
        (6, 1, {}, True),  # is_test defaults to 0: training, Y from batch statistics
        (6, 1, {"is_test": 1}, False),
        (6, 5, {"is_test": 0, "spatial": 0}, True),
        (7, 1, {}, False),
        (7, 5, {"spatial": 1}, True),
        (9, 1, {}, False),
        (9, 5, {}, True),
        (14, 1, {}, False),
        (14, 3, {"training_mode": 1}, True),
        (15, 1, {"training_mode": 0}, False),
        (15, 3, {"training_mode": 1}, True),
        (15, 1, {"training_mode": 1}, True),  # accepted by bnfold; ONNX shape inference wants 3 outputs
    ],
)
def test_mode_follows_each_opsets_convention(opset, outputs, attributes, training) -> None:
    names = ["Y", "rm", "rv", "sm", "sv"][:outputs]
    semantics = resolve_semantics(attributes, names, opset)
    assert semantics.training is training
    assert semantics.output_count == outputs
    assert semantics.epsilon == FLOAT32_EPSILON and semantics.momentum == FLOAT32_MOMENTUM


@pytest.mark.parametrize(
    ("opset", "outputs", "attributes", "message"),
    [
        (9, 3, {}, "BatchNormalization-9: 3 outputs; 1 output means inference, 5 outputs mean training"),
        (7, 2, {}, "BatchNormalization-7: 2 outputs; 1 output means inference, 5 outputs mean training"),
        (15, 3, {}, "BatchNormalization-15: 3 outputs; training_mode=0 takes Y"),
        (15, 2, {"training_mode": 1}, "2 outputs; training_mode=1 takes Y, running_mean, running_var"),
        (14, 5, {"training_mode": 1}, "BatchNormalization-14: 5 outputs; training_mode=1 takes Y"),
        (6, 5, {"is_test": 1}, "BatchNormalization-6: 5 outputs; is_test=1 takes only Y"),
        (6, 3, {}, r"3 outputs; is_test=0 \(training\) takes 1 or 5 outputs"),
        (15, 1, {"training_mode": 2}, "attribute training_mode must be 0 or 1, got 2"),
        (7, 1, {"spatial": 3}, "attribute spatial must be 0 or 1, got 3"),
        (9, 1, {"spatial": 1}, "BatchNormalization-9: attribute\\(s\\) spatial not defined at this version"),
        (9, 5, {"training_mode": 1}, "attribute\\(s\\) training_mode not defined"),
        (7, 1, {"is_test": 1}, "attribute\\(s\\) is_test not defined"),
        (14, 1, {"momentum": "fast"}, "attribute momentum must be a float, got 'fast'"),
    ],
)
def test_invalid_combinations_raise_invalid_model_error(opset, outputs, attributes, message) -> None:
    names = ["Y", "rm", "rv", "sm", "sv"][:outputs]
    with pytest.raises(InvalidModelError, match=message):
        resolve_semantics(attributes, names, opset)


def test_unnamed_y_is_refused() -> None:
    with pytest.raises(InvalidModelError, match="output Y must be named"):
        resolve_semantics({"training_mode": 1}, ["", "rm", "rv"], 15)


def test_node_semantics_reads_proto_and_ir_nodes() -> None:
    proto = bn_model(14, outputs=3, attributes={"training_mode": 1, "epsilon": 1e-3, "momentum": 0.7})
    from_proto = node_semantics(proto.graph.node[0], opset=14)
    from_ir = node_semantics(ir.from_proto(proto).graph.node(0))  # opset from the graph's imports
    assert from_proto == from_ir
    assert from_ir.version == 14 and from_ir.training
    assert from_ir.epsilon == float(np.float32(1e-3)) and from_ir.momentum == float(np.float32(0.7))


def test_node_semantics_needs_an_opset_for_a_proto() -> None:
    with pytest.raises(UsageError, match=r"node 'bn': pass opset="):
        node_semantics(_node(["Y"]))


def test_node_semantics_refuses_other_ops() -> None:
    relu = oh.make_node("Relu", ["X"], ["Y"], name="relu")
    with pytest.raises(UsageError, match=r"node 'relu' is ai\.onnx::Relu, not BatchNormalization"):
        node_semantics(relu, opset=15)


@pytest.mark.parametrize("opset", [7, 9])
def test_five_outputs_are_running_stats_then_saved_mean_and_inverse_std(opset: int) -> None:
    rng = np.random.default_rng(opset)
    feeds = bn_inputs(rng, (3, 2, 4), x_dtype=np.float64)
    node = _node(["Y", "rm", "rv", "sm", "sv"], epsilon=1e-3, momentum=0.75)
    y, running_mean, running_var, saved_mean, saved_inv_std = evaluate_batch_norm_node(
        node, list(feeds.values()), opset=opset
    )
    x = feeds["X"]
    batch_mean, batch_var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    epsilon, momentum = float(np.float32(1e-3)), float(np.float32(0.75))
    np.testing.assert_allclose(saved_mean, batch_mean, rtol=1e-14)
    np.testing.assert_allclose(saved_inv_std, 1 / np.sqrt(batch_var + epsilon), rtol=1e-14)
    np.testing.assert_allclose(running_mean, feeds["mean"] * momentum + batch_mean * (1 - momentum), rtol=1e-14)
    np.testing.assert_allclose(running_var, feeds["var"] * momentum + batch_var * (1 - momentum), rtol=1e-14)
    expected_y = (x - batch_mean[:, None]) * (saved_inv_std * feeds["scale"])[:, None] + feeds["B"][:, None]
    np.testing.assert_allclose(y, expected_y, rtol=1e-13)


def test_empty_output_slots_are_not_produced() -> None:
    rng = np.random.default_rng(0)
    feeds = bn_inputs(rng, (3, 2, 4))
    outputs = evaluate_batch_norm_node(_node(["Y", "", "rv"], training_mode=1), list(feeds.values()), opset=15)
    assert outputs[1] is None
    assert outputs[0].shape == (3, 2, 4) and outputs[2].shape == (2,)


def test_opset_6_default_is_training_mode_even_with_one_output() -> None:
    rng = np.random.default_rng(1)
    feeds = bn_inputs(rng, (4, 3, 2))
    (y,) = evaluate_batch_norm_node(_node(["Y"]), list(feeds.values()), opset=6)
    (y_test,) = evaluate_batch_norm_node(_node(["Y"], is_test=1), list(feeds.values()), opset=6)
    expected_train = batch_norm_forward(*feeds.values(), epsilon=FLOAT32_EPSILON).y
    expected_test = batch_norm_forward(*feeds.values(), epsilon=FLOAT32_EPSILON, training=False).y
    np.testing.assert_array_equal(y, expected_train)
    np.testing.assert_array_equal(y_test, expected_test)
    assert not np.allclose(y, y_test)


@pytest.mark.parametrize("opset", [1, 6, 7])
def test_spatial_zero_normalises_per_activation(opset: int) -> None:
    rng = np.random.default_rng(2)
    feeds = bn_inputs(rng, (5, 2, 3), x_dtype=np.float64, param_shape=(2, 3))
    attributes = {"spatial": 0} | ({"consumed_inputs": [0, 0, 0, 1, 1]} if opset == 1 else {})
    y, running_mean, running_var, saved_mean, saved_inv_std = evaluate_batch_norm_node(
        _node(["Y", "rm", "rv", "sm", "sv"], **attributes), list(feeds.values()), opset=opset
    )
    x = feeds["X"]
    batch_mean, batch_var = x.mean(axis=0), x.var(axis=0)
    assert running_mean.shape == (2, 3) and saved_inv_std.shape == (2, 3)
    np.testing.assert_allclose(saved_mean, batch_mean, rtol=1e-14)
    np.testing.assert_allclose(running_var, feeds["var"] * FLOAT32_MOMENTUM + batch_var * (1 - FLOAT32_MOMENTUM))
    expected = (x - batch_mean) / np.sqrt(batch_var + FLOAT32_EPSILON) * feeds["scale"] + feeds["B"]
    np.testing.assert_allclose(y, expected, rtol=1e-13)


def test_spatial_zero_needs_one_parameter_per_activation() -> None:
    feeds = bn_inputs(np.random.default_rng(3), (5, 2, 3), param_shape=(2,))
    with pytest.raises(InvalidModelError, match=r"input scale with spatial=0 must hold 6 values .* got shape \(2,\)"):
        evaluate_batch_norm_node(_node(["Y"], spatial=0, is_test=1), list(feeds.values()), opset=6)


def test_opset_15_output_dtypes_follow_t_t1_t2() -> None:
    rng = np.random.default_rng(4)
    feeds = bn_inputs(rng, (4, 2, 3), x_dtype=np.float16, scale_dtype=np.float64, stats_dtype=BFLOAT16)
    y, running_mean, running_var = evaluate_batch_norm_node(
        _node(["Y", "rm", "rv"], training_mode=1), list(feeds.values()), opset=15
    )
    assert (y.dtype, running_mean.dtype, running_var.dtype) == (np.float16, BFLOAT16, BFLOAT16)


@pytest.mark.parametrize(
    ("opset", "dtypes", "message"),
    [
        (9, (np.float32, np.float32, np.float32, np.float64, np.float64), "X, scale, B, mean, var share type T"),
        (9, (BFLOAT16,) * 5, "type T .* must be one of float16, float32, float64; got bfloat16"),
        (14, (np.float16, np.float32, np.float32, np.float32, np.float32), "X, scale, B share type T"),
        (14, (np.float32, np.float32, np.float32, np.float16, np.float32), "mean, var share type U"),
        (15, (np.float32, np.float16, np.float64, np.float32, np.float32), "scale, B share type T1"),
        (15, (np.int64,) + (np.float32,) * 4, "type T \\(X\\) must be one of .*; got int64"),
    ],
)
def test_type_constraints_per_version(opset, dtypes, message) -> None:
    rng = np.random.default_rng(5)
    arrays = [value.astype(dtype) for value, dtype in zip(bn_inputs(rng, (3, 2)).values(), dtypes, strict=True)]
    with pytest.raises(InvalidModelError, match=message):
        evaluate_batch_norm_node(_node(["Y"]), arrays, opset=opset)


def test_parameter_shape_and_input_count_are_checked() -> None:
    feeds = bn_inputs(np.random.default_rng(6), (3, 2))
    wrong = [feeds["X"], np.ones(3, np.float32), feeds["B"], feeds["mean"], feeds["var"]]
    with pytest.raises(InvalidModelError, match=r"input scale must have shape \(2,\), got \(3,\)"):
        evaluate_batch_norm_node(_node(["Y"]), wrong, opset=15)
    with pytest.raises(InvalidModelError, match=r"takes 5 inputs .* got 4"):
        evaluate_batch_norm_node(_node(["Y"]), list(feeds.values())[:4], opset=15)


def test_training_with_an_empty_batch_is_an_invalid_model_error() -> None:
    arrays = [np.zeros((0, 2), np.float32)] + [np.ones(2, np.float32)] * 4
    with pytest.raises(InvalidModelError, match="at least one element per channel"):
        evaluate_batch_norm_node(_node(["Y", "rm", "rv"], training_mode=1), arrays, opset=15)
