"""The float64-grounded verdict (issue 15): a correct fold of an ill-conditioned network passes, every injected
bug fails with the right fold named, on ill- and well-conditioned networks alike; cost bounds and fixed bounds.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from ill_conditioned import (
    fold,
    inject,
    mobilenet_v3_large_head,
    resnet50_layout,
    wide_ill_conditioned,
    wide_well_conditioned,
)
from onnx import helper
from onnx.reference import ReferenceEvaluator

from bnfold.validate import Verdict, VerifyReport, verify
from bnfold.validate.float64_reference import Float64Limits, as_float64_model
from bnfold.validate.verifier import VerificationTimeout

MODELS = {
    "resnet50_layout": resnet50_layout,
    "mobilenet_v3_large_head": mobilenet_v3_large_head,
    "wide_ill_conditioned": wide_ill_conditioned,
    "wide_well_conditioned": wide_well_conditioned,
}


@pytest.fixture(scope="module")
def folded_models():
    """``{name: (original, folded, probes, folded records)}``, built once."""
    return {name: (build(), *fold(build())) for name, build in MODELS.items()}


@pytest.fixture(scope="module")
def resnet_verified(folded_models):
    original, candidate, probes, _ = folded_models["resnet50_layout"]
    return verify(original, candidate, probes=probes)


def test_ill_conditioned_correct_fold_fails_the_float32_comparison_alone(folded_models):
    """The issue's report, reproduced: a correct fold, yet the elementwise float32 check fails and blames a fold."""
    original, candidate, probes, _ = folded_models["resnet50_layout"]
    report = verify(original, candidate, probes=probes, float64=False)
    assert report.verdict is Verdict.FAILED
    assert report.runs[0].float64 is None
    assert report.verdicts[0].basis == "float32"


def test_ill_conditioned_correct_fold_passes_against_float64(resnet_verified):
    report = resnet_verified
    assert report.verdict is Verdict.PASSED
    (run,), (verdict,) = report.runs, report.verdicts
    assert verdict.basis == "float64"
    assert verdict.verdict is Verdict.PASSED
    # the float32 table alone fails the output: the float64 truth overrules it
    assert [judgement.verdict for judgement in verdict.outputs] == [Verdict.FAILED]
    check = run.float64
    assert check.engine.startswith("onnx.reference")  # onnxruntime has no float64 Conv
    assert check.iterations == report.iterations and check.elapsed_s > 0 and check.unavailable is None
    (output,) = check.outputs
    original, candidate = output.original.errors.max_abs, output.candidate.errors.max_abs
    assert original > 0 and candidate <= 4 * original
    assert f"output: original {original:.3g}, candidate {candidate:.3g}" in verdict.reasons[0]
    assert len(check.probes) == 53 and all(truth.scope == "fold" for truth in check.probes)
    # each fold, cut out, is as close to float64 as the original layers it replaces
    assert all(j.verdict is Verdict.PASSED for j in verdict.float64_probes)


def test_float64_report_round_trips_and_rejudges(resnet_verified):
    report = resnet_verified
    saved = VerifyReport.from_json(report.to_json())
    assert saved == report
    assert saved.verdicts[0].basis == "float64"


def test_explicit_tolerance_is_a_fixed_bound_without_float64_rescue(folded_models):
    original, candidate, probes, _ = folded_models["resnet50_layout"]
    report = verify(original, candidate, probes=probes, atol=1e-4, rtol=1e-4)
    assert report.verdict is Verdict.FAILED
    assert report.runs[0].float64 is None
    assert report.verdicts[0].basis == "float32"


def test_float64_run_is_refused_above_the_size_limit_and_says_so(folded_models):
    original, candidate, probes, _ = folded_models["resnet50_layout"]
    report = verify(original, candidate, probes=probes, float64_limits=Float64Limits(max_parameters=1000))
    assert report.verdict is Verdict.FAILED
    (verdict,) = report.verdicts
    assert verdict.basis == "float32"
    assert "above the float64 limit of 1,000" in report.runs[0].float64.unavailable
    assert any(reason.startswith("no float64 verdict: the model has") for reason in verdict.reasons)


def test_well_conditioned_correct_fold_passes_without_a_float64_run(folded_models):
    for name in ("wide_well_conditioned", "wide_ill_conditioned", "mobilenet_v3_large_head"):
        original, candidate, probes, _ = folded_models[name]
        report = verify(original, candidate, probes=probes)
        assert report.verdict is Verdict.PASSED, name
        assert report.runs[0].float64 is None, name  # fast path: nothing ran in float64


# (model, index of the folded record to break): a deep fold in the ill-conditioned ResNet, the 2,048-channel
# fold of both wide models, an early fold of MobileNetV3 (whose effect the network attenuates below tolerance).
TARGETS = [
    ("resnet50_layout", -3),
    ("wide_ill_conditioned", 1),
    ("wide_well_conditioned", 1),
    ("mobilenet_v3_large_head", 1),
]


@pytest.mark.parametrize("bug", ["weight", "channel", "bias"])
@pytest.mark.parametrize(("name", "index"), TARGETS)
def test_injected_bug_fails_and_names_the_fold(folded_models, name, index, bug):
    original, candidate, probes, records = folded_models[name]
    record = records[index]
    report = verify(original, inject(candidate, record, bug), probes=probes)
    assert report.verdict is Verdict.FAILED
    (verdict,) = report.verdicts
    assert verdict.responsible == record.node
    assert report.responsible == (record.node,)
    assert f"first divergent fold: {record.node}" in verdict.reasons
    if verdict.basis == "float64":
        (check,) = [run.float64 for run in report.runs]
        broken = next(truth for truth in check.probes if truth.label == record.node)
        assert broken.candidate.errors.max_abs > 100 * broken.original.errors.max_abs


def test_the_wide_fold_has_2048_channels(folded_models):
    original, _, _, records = folded_models["wide_well_conditioned"]
    weights = {tensor.name: tensor for tensor in original.graph.initializer}
    conv = next(node for node in original.graph.node if node.op_type == "Conv" and node.output[0] in
                {n.input[0] for n in original.graph.node if n.name == records[1].node})  # fmt: skip
    assert weights[conv.input[1]].dims[0] == 2048


def test_timeout_stops_the_verification(folded_models):
    original, candidate, probes, _ = folded_models["wide_well_conditioned"]
    with pytest.raises(VerificationTimeout, match="timed out after 1e-09 s"):
        verify(original, candidate, probes=probes, timeout_s=1e-9)


def test_progress_is_reported_per_iteration(folded_models):
    original, candidate, probes, _ = folded_models["wide_well_conditioned"]
    events = []
    verify(original, candidate, probes=probes, progress=lambda *event: events.append(event))
    assert ("original (cpu)", 3, 3) in events and ("cpu: candidate", 3, 3) in events


def test_float64_copy_widens_constants_casts_and_types():
    nodes = [
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["x32", "half"], ["scaled"]),
        helper.make_node("Add", ["scaled", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "widen",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
        [onnx.numpy_helper.from_array(np.array([1 / 3] * 3, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    widened = as_float64_model(model)
    onnx.checker.check_model(widened, full_check=True)
    assert widened.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert widened.graph.node[1].attribute[0].i == onnx.TensorProto.DOUBLE
    (result,) = ReferenceEvaluator(widened).run(None, {"x": np.array([1.0, 2.0, 3.0])})
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, np.array([1.0, 2.0, 3.0]) * 0.5 + np.float64(np.float32(1 / 3)))


def _zero_float32_table():
    """A table (not an explicit atol/rtol) that fails every float32 difference: forces the float64 stage."""
    from bnfold.validate.tolerances import DEFAULT_TOLERANCES, Tolerance, ToleranceTable

    return ToleranceTable(by_dtype={**DEFAULT_TOLERANCES, "float32": Tolerance(0.0, 0.0)})


@pytest.mark.parametrize("name", ["mlp", "convmixer", "shufflenet_v2"])
def test_folds_of_every_kind_pass_fold_by_fold_against_float64(tmp_path, name):
    """MatMul/Gemm folds (the bias Add keeps its name), a forward fold into a Gemm, channel shuffles: each
    fold is cut where both models compute the same tensors, and a correct one passes."""
    from models.build import build_model

    original = onnx.load(build_model(name, tmp_path))
    candidate, probes, _ = fold(original)
    report = verify(original, candidate, probes=probes, tolerances=_zero_float32_table())
    (run,), (verdict,) = report.runs, report.verdicts
    assert verdict.basis == "float64" and report.verdict is Verdict.PASSED, verdict.reasons
    assert len(run.float64.probes) == len(probes) and all(t.scope == "fold" for t in run.float64.probes)


def test_fold_cut_starts_where_both_models_agree():
    from validate_builders import conv_bn_chain, folded

    from bnfold.validate.local_folds import fold_inputs, shared_tensors, sub_model
    from bnfold.validate.model_source import load_model_source

    original = conv_bn_chain(2)
    candidate, probes = folded(original)
    original_source, candidate_source = load_model_source(original), load_model_source(candidate)
    shared = shared_tensors(candidate_source, original_source, probes)
    assert {"x", "bn0_out", "relu0_out", "bn1_out"} <= shared
    assert fold_inputs(candidate_source, "bn1_out", shared) == ("relu0_out",)
    cut = sub_model(original_source, ("relu0_out",), "bn1_out", {"relu0_out": np.dtype("float32")})
    assert [node.op_type for node in cut.proto.graph.node] == ["Conv", "BatchNormalization"]


def test_ci_reports_follow_the_float64_verdict(resnet_verified, folded_models):
    from bnfold.validate.github_summary import verify_markdown
    from bnfold.validate.junit import verify_cases

    assert [case.failure for case in verify_cases(resnet_verified)] == [None]
    markdown = verify_markdown(resnet_verified)
    assert "### bnfold verify: ✅ passed" in markdown and "judged against float64" in markdown
    assert "❌" not in markdown
    # a fold that diverges while the outputs stay within tolerance fails its output's test case
    original, candidate, probes, records = folded_models["mobilenet_v3_large_head"]
    report = verify(original, inject(candidate, records[1], "bias"), probes=probes)
    (case,) = verify_cases(report)
    assert case.failure is not None and f"first divergent fold: {records[1].node}" in case.failure
