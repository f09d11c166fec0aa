"""Measurements and verdicts per tensor: NaN/Inf placement, shapes, dtypes, missing outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from validate_builders import OPSET

from bnfold.validate import Tolerance, Verdict, verify
from bnfold.validate.metrics import TensorComparator
from bnfold.validate.report import judge_tensor

HUGE = Tolerance(atol=1e30, rtol=1e30)
nan, inf = np.nan, np.inf


def _judge(reference, candidate, tolerance=HUGE):
    comparator = TensorComparator("y")
    comparator.add(np.asarray(reference, np.float32), None if candidate is None else np.asarray(candidate))
    metrics = comparator.result()
    return metrics, judge_tensor(metrics, tolerance)


def test_nan_at_the_same_places_passes_and_is_excluded_from_the_errors():
    metrics, judgement = _judge([nan, 1.0, 2.0], np.array([nan, 1.0, 2.5], np.float32), Tolerance(0.5, 0.0))
    assert judgement.verdict is Verdict.PASSED
    assert metrics.errors.compared == 2
    assert metrics.errors.max_abs == 0.5
    assert (metrics.new_nan, metrics.lost_nan) == (0, 0)


def test_a_new_nan_fails_whatever_the_tolerance():
    metrics, judgement = _judge([0.0, 1.0], np.array([nan, 1.0], np.float32))
    assert metrics.new_nan == 1
    assert judgement.verdict is Verdict.FAILED
    assert judgement.reasons == ("1 new NaN in the candidate",)


def test_a_lost_nan_fails():
    metrics, judgement = _judge([nan, 1.0], np.array([0.0, 1.0], np.float32))
    assert (metrics.new_nan, metrics.lost_nan) == (0, 1)
    assert judgement.reasons == ("1 reference NaN missing in the candidate",)


def test_inf_placement_and_sign_are_checked():
    _, same = _judge([inf, -inf, 1.0], np.array([inf, -inf, 1.0], np.float32), Tolerance(0.0, 0.0))
    assert same.verdict is Verdict.PASSED
    flipped, judgement = _judge([inf, 1.0], np.array([-inf, 1.0], np.float32))
    assert (flipped.new_inf, flipped.lost_inf) == (1, 1)
    assert judgement.verdict is Verdict.FAILED
    new, _ = _judge([1.0, 1.0], np.array([inf, 1.0], np.float32))
    assert (new.new_inf, new.lost_inf) == (1, 0)
    lost, _ = _judge([inf, 1.0], np.array([3.0, 1.0], np.float32))
    assert (lost.new_inf, lost.lost_inf) == (0, 1)


def test_shape_mismatch_fails_and_names_the_iteration():
    comparator = TensorComparator("y")
    comparator.add(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32))
    comparator.add(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    metrics = comparator.result()
    assert metrics.shape_mismatches == (1,)
    judgement = judge_tensor(metrics, HUGE)
    assert judgement.reasons == ("shape [2, 4] differs from the reference's [2, 3] (iteration 1)",)
    assert metrics.errors.compared == 3  # the matching iteration is still measured


def test_dtype_mismatch_fails():
    metrics, judgement = _judge([1.0, 2.0], np.array([1.0, 2.0], np.float64))
    assert (metrics.reference_dtype, metrics.candidate_dtype) == ("float32", "float64")
    assert judgement.reasons == ("dtype float64 differs from the reference's float32",)


def test_missing_output_fails():
    metrics, judgement = _judge([1.0], None)
    assert metrics.missing
    assert judgement.reasons == ("the candidate does not produce this tensor",)
    assert judgement.required_atol is None


def test_metrics_round_trip_through_dict_including_infinite_values():
    comparator = TensorComparator("y")
    comparator.add(np.array([0.0, 2.0], np.float32), np.array([1.0, 2.0], np.float32))
    metrics = comparator.result()
    assert metrics.errors.max_rel == np.inf
    data = metrics.to_dict()
    assert data["errors"]["max_rel"] == "inf"
    assert type(metrics).from_dict(data) == metrics


def _unary_model(op_types: list[str]) -> onnx.ModelProto:
    names = ["x", *(f"t{i}" for i in range(len(op_types) - 1)), "y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]]) for i, op in enumerate(op_types)]
    graph = helper.make_graph(
        nodes,
        "unary",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.mark.parametrize("atol", [None, 1e30])
def test_verify_fails_a_candidate_that_creates_nan(atol):
    # sqrt(|x|) vs sqrt(x): NaN wherever the generated input is negative
    report = verify(_unary_model(["Abs", "Sqrt"]), _unary_model(["Identity", "Sqrt"]), atol=atol)
    assert report.verdict is Verdict.FAILED
    (output,) = report.runs[0].outputs
    assert output.new_nan > 0
    assert report.verdicts[0].outputs[0].reasons[0] == f"{output.new_nan} new NaN in the candidate"


def test_verify_passes_nan_produced_by_both_models():
    # log(x) is NaN for negative inputs in both models
    report = verify(_unary_model(["Log"]), _unary_model(["Identity", "Log"]))
    (output,) = report.runs[0].outputs
    assert report.verdict is Verdict.PASSED
    assert (output.new_nan, output.lost_nan) == (0, 0)
    assert output.errors.compared < sum(np.prod(shape) for shape in output.reference_shapes)
