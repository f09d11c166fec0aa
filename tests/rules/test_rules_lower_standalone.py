"""Standalone BatchNormalization: kept by default, lowered to Mul + Add on request."""

from __future__ import annotations

import numpy as np
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

from bnfold.passes import FoldBatchNormPass, LowerStandaloneBatchNormPass, SkipReason
from bnfold.report import FoldStatus


def standalone_bn(shape=(2, 3, 4, 5), dtype=np.float32, **bn_attributes):
    nodes = [bn_node("X", "Y", **bn_attributes)]
    return make_model(nodes, [io("X", dtype, list(shape))], [io("Y", dtype, list(shape))], bn_arrays(shape[1], dtype))


def test_skips_when_standalone_by_default():
    original = standalone_bn()
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.NO_PRODUCER)
    assert op_types(folded) == ["BatchNormalization"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 2, 2)], ids=["1d", "2d", "3d", "4d"])
def test_folds_standalone_bn_by_lowering(dtype, shape):
    original = standalone_bn(shape, dtype)
    folded, report = fold_proto(original, lower_standalone=True)
    record = only_record(report)
    assert_folded(record, "lower_standalone")
    assert record.output == "Y"
    assert "NO_PRODUCER" in record.detail
    assert op_types(folded) == ["Mul", "Add"]
    assert folded.graph.node[1].output[0] == "Y"
    constants = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert sorted(constants) == ["bn_scale", "bn_shift"]
    assert all(c.shape == (3,) + (1,) * (len(shape) - 2) and c.dtype == np.dtype(dtype) for c in constants.values())
    assert_equivalent(original, folded, dtype)


def test_folds_only_what_no_rule_folds_when_lowering():
    """Conv → BN folds; Relu → BN (after it) is lowered."""
    dtype = np.float32
    arrays = {"W": np.random.default_rng(0).standard_normal((3, 3, 1, 1)).astype(dtype), **bn_arrays(3, dtype)}
    arrays |= bn_arrays(3, dtype, "bn2", 1)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        bn_node("c", "b1"),
        helper.make_node("Relu", ["b1"], ["r"], name="relu"),
        bn_node("r", "Y", prefix="bn2"),
    ]
    shape = [1, 3, 4, 4]
    original = make_model(nodes, [io("X", dtype, shape)], [io("Y", dtype, shape)], arrays)
    folded, report = fold_proto(original, lower_standalone=True)
    assert [(r.node, r.rule) for r in report.records] == [("bn", "conv"), ("bn2", "lower_standalone")]
    assert op_types(folded) == ["Conv", "Relu", "Mul", "Add"]
    assert_equivalent(original, folded, dtype)


def test_skips_when_lowering_needs_an_unknown_rank():
    dtype = np.float32
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"), bn_node("r", "Y")]
    original = make_model(nodes, [io("X", dtype, [2, 3, 4])], [io("Y", dtype, [2, 3, 4])], bn_arrays(3, dtype))
    model = ir.serde.deserialize_model(original)
    model.graph.inputs[0].shape = None  # no shape anywhere now: neither recorded nor inferable
    model.graph.outputs[0].shape = None
    result = FoldBatchNormPass(lower_standalone=True)(model)
    record = only_record(result.report)
    assert_skipped(record, SkipReason.RANK_UNKNOWN)
    assert "UNSUPPORTED_PRODUCER" in record.detail
    assert [node.op_type for node in model.graph] == ["Relu", "BatchNormalization"]


def test_skips_when_lowering_a_training_mode_bn():
    dtype, shape = np.float32, [2, 3, 4]
    node = bn_node("X", "Y", training_mode=1)
    node.output.extend(["running_mean", "running_var"])
    original = make_model([node], [io("X", dtype, shape)], [io("Y", dtype, shape)], bn_arrays(3, dtype))
    folded, report = fold_proto(original, lower_standalone=True)
    assert_skipped(only_record(report), SkipReason.TRAINING_MODE)
    assert op_types(folded) == ["BatchNormalization"]


def test_lower_standalone_pass_runs_after_the_fold_in_a_pass_manager():
    dtype = np.float32
    arrays = {"W": np.random.default_rng(0).standard_normal((3, 3, 1, 1)).astype(dtype), **bn_arrays(3, dtype)}
    arrays |= bn_arrays(3, dtype, "bn2", 1)
    nodes = [
        bn_node("X", "b0", prefix="bn2"),
        helper.make_node("Conv", ["b0", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "Y"),
    ]
    original = make_model(nodes, [io("X", dtype, [1, 3, 4, 4])], [io("Y", dtype, [1, 3, 6, 6])], arrays)
    model = ir.serde.deserialize_model(original)
    manager = ir.passes.PassManager([FoldBatchNormPass(), LowerStandaloneBatchNormPass()])
    fold_pass, lower_pass = manager.passes
    result = manager(model)
    assert result.modified
    assert [(r.node, r.status, r.reason) for r in fold_pass.report.records] == [
        ("bn2", FoldStatus.SKIPPED, SkipReason.CONV_HAS_PADDING),
        ("bn", FoldStatus.FOLDED, None),
    ]
    assert [(r.node, r.rule) for r in lower_pass.report.records] == [("bn2", "lower_standalone")]
    folded = ir.to_proto(model)
    assert op_types(folded) == ["Mul", "Add", "Conv"]
    assert_equivalent(original, folded, dtype)


def test_folds_standalone_bn_by_lowering_with_an_inferred_rank():
    """Relu's output records no shape; ONNX shape inference supplies rank and dtype for the constants."""
    dtype = np.float32
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"), bn_node("r", "Y")]
    original = make_model(nodes, [io("X", dtype, [2, 3, 4])], [io("Y", dtype, [2, 3, 4])], bn_arrays(3, dtype))
    model = ir.serde.deserialize_model(original)
    model.graph.outputs[0].shape = None
    model.graph.outputs[0].type = None
    result = FoldBatchNormPass(lower_standalone=True)(model)
    assert_folded(only_record(result.report), "lower_standalone")
    folded = ir.to_proto(model)
    assert op_types(folded) == ["Relu", "Mul", "Add"]
    assert [tuple(i.dims) for i in folded.graph.initializer] == [(3, 1), (3, 1)]
    assert_equivalent(original, folded, dtype)
