"""The fp16 precision guard (:mod:`bnfold.passes.precision`): a fold whose folded tensors would round far worse
in the weights' dtype than the original is skipped with ``FOLD_LOSES_PRECISION``; the flag folds anyway.

The bad case is the mechanism of docs/rules.md ("fp16 precision guard"): a Conv reads a nearly flat input
(``1 + 1e-3·noise``), so its outputs barely vary and BN's running variance is near zero (BN's scale
``s = γ/√(var+ε)`` ~ 300). Half of the filters sum to zero per input channel (their output cancels to ~0),
the others keep a realistic mean: the folded weights ``W·s`` and shift ``β − s·mean`` are large numbers whose
fp16 rounding the small output cannot absorb.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import bnfold
from bnfold.cli import main
from bnfold.passes import FoldBatchNormPass
from bnfold.passes.precision import BatchNormInput, channel_costs, precision_bound
from bnfold.workflow import FoldOptions
from tests.rules.rules_helpers import (
    assert_equivalent,
    assert_folded,
    assert_skipped,
    bn_arrays,
    bn_node,
    io,
    make_model,
    only_record,
    run,
    session,
    widen_to_float64,
)

CHANNELS, INPUTS = 8, 4
SHAPE = [2, INPUTS, 10, 10]


def flat_input(seed: int = 3) -> np.ndarray:
    """The data the bad case sees: a flat image with a little noise."""
    return 1.0 + 1e-3 * np.random.default_rng(seed).standard_normal(SHAPE)


def conv_bn(dtype, *, cancelling: bool) -> onnx.ModelProto:
    """Conv (3x3, no padding, no bias) → BN, with statistics measured on :func:`flat_input` (``cancelling``:
    the near-zero-variance bad case) or on ``N(0.5, 1)`` data (a realistic BN)."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(-0.3, 0.3, (CHANNELS, INPUTS, 3, 3))
    if cancelling:
        weight[::2] -= weight[::2].mean(axis=(2, 3), keepdims=True)  # zero-sum filters: their output cancels
    weight = weight.astype(dtype)
    data = flat_input(seed=7) if cancelling else 0.5 + rng.standard_normal(SHAPE)
    outputs = _conv(data, weight.astype(np.float64))
    arrays = {"w": weight}
    bn = bn_arrays(CHANNELS, np.float64)
    bn["bn_mean"] = outputs.mean(axis=(0, 2, 3))
    bn["bn_var"] = outputs.var(axis=(0, 2, 3))
    arrays.update({name: value.astype(dtype) for name, value in bn.items()})
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    return make_model(nodes, [io("x", dtype, SHAPE)], [io("y", dtype, [2, CHANNELS, 8, 8])], arrays)


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A valid 3x3 convolution in float64 (for the BN statistics)."""
    out = np.zeros((x.shape[0], w.shape[0], x.shape[2] - 2, x.shape[3] - 2))
    for i in range(3):
        for j in range(3):
            patch = x[:, :, i : i + x.shape[2] - 2, j : j + x.shape[3] - 2]
            out += np.einsum("nchw,mc->nmhw", patch, w[:, :, i, j])
    return out


def relative_error(model: onnx.ModelProto, truth: np.ndarray, x: np.ndarray) -> float:
    """The model's largest error against ``truth``, relative to ``max(1, max|truth|)``, in onnxruntime
    (optimisations off)."""
    got = session(model).run(None, {"x": x})[0].astype(np.float64)
    return float(np.max(np.abs(got - truth)) / max(1.0, float(np.max(np.abs(truth)))))


def test_skips_when_fold_loses_precision() -> None:
    model = conv_bn(np.float16, cancelling=True)
    folded, report = bnfold.fold(model)
    record = only_record(report)
    assert_skipped(record, bnfold.SkipReason.FOLD_LOSES_PRECISION)
    assert record.precision_cost > precision_bound(ir.DataType.FLOAT16) == 16
    assert "FLOAT16" in record.detail
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    assert [node.op_type for node in proto.graph.node] == ["Conv", "BatchNormalization"]  # untouched
    assert report.to_dict()["records"][0]["precision_cost"] == record.precision_cost


def test_skip_protects_accuracy_against_a_float_truth() -> None:
    """Measured in onnxruntime (optimisations off) against the same network in float64: the fold would make
    the fp16 model many times less accurate; the guarded model keeps the original's accuracy."""
    model = conv_bn(np.float16, cancelling=True)
    x = flat_input().astype(np.float16)
    truth = run(widen_to_float64(model), {"x": x.astype(np.float64)})[0]
    original = relative_error(model, truth, x)
    guarded = relative_error(ir.to_proto(bnfold.fold(model)[0]), truth, x)
    unguarded_model, report = bnfold.fold(model, options=FoldOptions(allow_precision_loss=True))
    assert_folded(only_record(report), "conv")
    unguarded = relative_error(ir.to_proto(unguarded_model), truth, x)
    assert guarded == original
    assert unguarded > 10 * original, (original, unguarded)
    assert unguarded > 1e-2


def test_folds_bad_case_with_precision_guard_off() -> None:
    model = conv_bn(np.float16, cancelling=True)
    folded = ir.from_proto(model)
    result = FoldBatchNormPass(precision_guard=False)(folded)
    record = only_record(result.report)
    assert_folded(record, "conv")
    assert record.precision_cost > 16  # still estimated and reported
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    assert [node.op_type for node in proto.graph.node] == ["Conv"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_folds_realistic_bn_with_a_small_cost(dtype) -> None:
    model = conv_bn(dtype, cancelling=False)
    folded, report = bnfold.fold(model)
    record = only_record(report)
    assert_folded(record, "conv")
    assert 1 <= record.precision_cost < 8
    proto = ir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    assert_equivalent(
        model, proto, dtype, feeds={"x": (0.5 + np.random.default_rng(2).standard_normal(SHAPE)).astype(dtype)}
    )


def test_folds_bad_case_in_float32() -> None:
    """In float32 the same fold costs ~cost·6e-8 relative: below the bound ``1e-4 / u``, it folds, and it is
    as accurate as the original against a float64 truth."""
    model = conv_bn(np.float32, cancelling=True)
    folded, report = bnfold.fold(model)
    record = only_record(report)
    assert_folded(record, "conv")
    assert 16 < record.precision_cost < precision_bound(ir.DataType.FLOAT)
    x = flat_input().astype(np.float32)
    truth = run(widen_to_float64(model), {"x": x.astype(np.float64)})[0]
    assert relative_error(ir.to_proto(folded), truth, x) <= 2 * relative_error(model, truth, x) + 1e-6


def test_cost_grows_with_mean_over_spread() -> None:
    """``|b'| = |β − s·m|`` against ``z_rms``: a realistic mean over a near-zero variance costs ~|m|/√v."""
    ones = np.ones(2)
    statistics = BatchNormInput.from_parameters(ones, 0.1 * ones, np.array([0.5, 0.5]), np.array([0.5, 1e-6]), 1e-5)
    shift = np.abs(statistics.beta - statistics.scale * statistics.mean)
    costs = channel_costs(statistics, ones, shift)
    assert costs[0] < 4
    assert costs[1] > 100


def test_cost_sees_a_cancelling_filter() -> None:
    """A channel with mean ~0 and tiny variance whose weights are as large as its neighbours': the input
    magnitude comes from the other channels, the weight rounding ``u·s·‖W‖·X`` dominates."""
    channels = 8
    mean = np.full(channels, 0.5)
    var = np.full(channels, 0.25)
    mean[0], var[0] = 0.0, 1e-6
    statistics = BatchNormInput.from_parameters(np.ones(channels), np.zeros(channels), mean, var, 1e-5)
    shift = np.abs(statistics.beta - statistics.scale * statistics.mean)
    costs = channel_costs(statistics, np.ones(channels), shift)
    assert costs[0] > 100
    assert costs[1:].max() < 4


def test_cli_allow_precision_loss_folds_and_json_has_the_cost(tmp_path, capsys) -> None:
    source = tmp_path / "bad.onnx"
    onnx.save(conv_bn(np.float16, cancelling=True), source)
    report_path = tmp_path / "report.json"
    assert (
        main(["fold", str(source), "-o", str(tmp_path / "kept.onnx"), "--no-verify", "--json", str(report_path), "-v"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "FOLD_LOSES_PRECISION" in printed
    record = json.loads(report_path.read_text())["fold"]["records"][0]
    assert record["reason"] == "FOLD_LOSES_PRECISION"
    assert record["precision_cost"] > 16
    output = tmp_path / "folded.onnx"
    assert main(["fold", str(source), "-o", str(output), "--no-verify", "-q", "--allow-precision-loss"]) == 0
    assert [node.op_type for node in onnx.load(output).graph.node] == ["Conv"]
