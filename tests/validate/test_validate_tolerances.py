"""The tolerance table, the error frontier behind "smallest passing atol/rtol", and re-judging reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from validate_builders import conv_bn_chain, folded, perturbed

from bnfold.errors import UsageError
from bnfold.validate import DEFAULT_TOLERANCES, Tolerance, ToleranceTable, Verdict, VerifyReport, verify
from bnfold.validate.metrics import TensorComparator
from bnfold.validate.report import judge_tensor


def test_default_table_is_keyed_by_the_four_floating_dtypes():
    assert set(DEFAULT_TOLERANCES) == {"float64", "float32", "float16", "bfloat16"}
    assert DEFAULT_TOLERANCES["float32"] == Tolerance(atol=1e-4, rtol=1e-4)
    assert DEFAULT_TOLERANCES["float64"] == Tolerance(atol=1e-9, rtol=1e-7)
    assert DEFAULT_TOLERANCES["float16"] == Tolerance(atol=1e-2, rtol=1e-2)
    assert DEFAULT_TOLERANCES["bfloat16"] == Tolerance(atol=8e-2, rtol=8e-2)
    # looser for less precise types
    order = ["float64", "float32", "float16", "bfloat16"]
    atols = [DEFAULT_TOLERANCES[d].atol for d in order]
    assert atols == sorted(atols)


def test_for_output_uses_the_dtype_row():
    table = ToleranceTable()
    assert table.for_output("y", "float16") == DEFAULT_TOLERANCES["float16"]
    assert table.for_output("y", "float32") == DEFAULT_TOLERANCES["float32"]


def test_integer_and_bool_outputs_must_match_exactly():
    table = ToleranceTable.with_overrides(atol=0.5, rtol=0.5)
    assert table.for_output("indices", "int64") == Tolerance(0.0, 0.0)
    assert table.for_output("mask", "bool") == Tolerance(0.0, 0.0)


def test_global_override_applies_to_floating_outputs_only_field_by_field():
    table = ToleranceTable.with_overrides(atol=1e-3)
    assert table.for_output("y", "float32") == Tolerance(atol=1e-3, rtol=1e-4)
    assert table.for_output("y", "float16") == Tolerance(atol=1e-3, rtol=1e-2)


def test_per_output_override_wins_over_global_and_table():
    table = ToleranceTable.with_overrides(atol=1e-3, rtol={"logits": 0.5})
    table = ToleranceTable.with_overrides(atol={"logits": 7.0}, base=table)
    assert table.for_output("logits", "float32") == Tolerance(atol=7.0, rtol=0.5)
    assert table.for_output("other", "float32") == Tolerance(atol=1e-3, rtol=1e-4)
    # a per-output override applies even to an integer output
    assert table.for_output("logits", "int64") == Tolerance(atol=7.0, rtol=0.5)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "1e-3", True])
def test_invalid_tolerance_values_are_usage_errors(bad):
    with pytest.raises(UsageError, match="finite number >= 0"):
        ToleranceTable.with_overrides(atol=bad)
    with pytest.raises(UsageError, match="finite number >= 0"):
        ToleranceTable.with_overrides(rtol={"y": bad})


def test_table_round_trips_through_dict():
    table = ToleranceTable.with_overrides(atol=1e-3, rtol={"y": 0.1})
    assert ToleranceTable.from_dict(table.to_dict()) == table


def _metrics(reference, candidate):
    comparator = TensorComparator("y")
    comparator.add(np.asarray(reference), np.asarray(candidate))
    return comparator.result()


def test_element_rule_is_atol_plus_rtol_times_reference():
    metrics = _metrics(np.array([0.0, 10.0], np.float32), np.array([0.5, 12.0], np.float32))
    assert judge_tensor(metrics, Tolerance(0.5, 0.2)).verdict is Verdict.PASSED
    assert judge_tensor(metrics, Tolerance(0.49, 0.2)).verdict is Verdict.FAILED  # element 0 needs atol 0.5
    assert judge_tensor(metrics, Tolerance(0.5, 0.14)).verdict is Verdict.FAILED  # element 1 needs 2 <= .5+10r
    judgement = judge_tensor(metrics, Tolerance(0.1, 0.1))
    assert judgement.required_atol == pytest.approx(1.0)  # max(0.5 - 0, 2.0 - 0.1·10)
    assert judgement.required_rtol == math.inf  # element 0 has |ref| = 0 and error > atol
    assert "would pass with atol=1" in judgement.reasons[0]


def test_required_tolerances_are_zero_for_identical_tensors():
    metrics = _metrics(np.arange(5.0), np.arange(5.0))
    judgement = judge_tensor(metrics, Tolerance(0.0, 0.0))
    assert judgement.verdict is Verdict.PASSED
    assert (judgement.required_atol, judgement.required_rtol) == (0.0, 0.0)
    assert metrics.errors.frontier == ()


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=40),
    rtol=st.sampled_from([0.0, 1e-4, 1e-2, 0.5]),
    atol=st.sampled_from([0.0, 1e-4, 1e-2, 0.5]),
)
def test_frontier_gives_the_exact_smallest_passing_tolerances(pairs, rtol, atol):
    reference = np.array([p[0] for p in pairs], np.float64)
    candidate = np.array([p[1] for p in pairs], np.float64)
    errors = _metrics(reference, candidate).errors
    error, magnitude = np.abs(candidate - reference), np.abs(reference)
    assert errors.required_atol(rtol) == pytest.approx(max(0.0, float(np.max(error - rtol * magnitude))))
    over = error > atol
    expected_rtol = 0.0
    if over.any():
        with np.errstate(divide="ignore"):
            expected_rtol = float(np.max(np.where(magnitude[over] > 0, (error[over] - atol) / magnitude[over], np.inf)))
    assert errors.required_rtol(atol) == pytest.approx(expected_rtol)
    brute = bool(np.all(error <= atol + rtol * magnitude))
    assert errors.within(Tolerance(atol, rtol)) == brute


def test_saved_report_is_rejudged_without_running_again():
    original = conv_bn_chain(2)
    candidate, probes = folded(original)
    report = verify(original, perturbed(candidate, "w0"), probes=probes)
    assert report.verdict is Verdict.FAILED
    saved = VerifyReport.from_json(report.to_json())
    assert saved == report
    (run,) = saved.runs
    # Probes (each fold's output) are judged too: the loosest bound any measured tensor needs passes them all.
    measured = [*run.outputs, *(probe.metrics for probe in run.probes)]
    needed = max(metrics.errors.required_atol(1e-4) for metrics in measured)
    loose = saved.judge(ToleranceTable.with_overrides(atol=needed))
    assert loose.verdict is Verdict.PASSED
    assert loose.runs == saved.runs  # measurements untouched
    assert loose.responsible == ()
    tight = saved.judge(ToleranceTable.with_overrides(atol=needed * 0.999))
    assert tight.verdict is Verdict.FAILED
    assert loose.judge(ToleranceTable()).to_dict() == report.to_dict()
