"""verify(): correct folds pass, a perturbed fold fails and is attributed, providers and interfaces are checked."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper
from validate_builders import conv_bn_chain, folded, folded_by_bnfold, perturbed, single_op_model

from bnfold.errors import InvalidModelError, ProviderUnavailableError, UsageError
from bnfold.validate import Verdict, verify
from bnfold.validate.sessions import resolve_provider

CUDA_MISSING = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def chain():
    original = conv_bn_chain(3, second_output=True)
    candidate, probes = folded(original)
    return original, candidate, probes


def test_correct_fold_passes_on_cpu(chain):
    original, candidate, probes = chain
    report = verify(original, candidate, probes=probes)
    assert report.verdict is Verdict.PASSED
    (run,) = report.runs
    assert run.executed_providers == ("CPUExecutionProvider",)
    assert [metrics.name for metrics in run.outputs] == ["y", "z"]
    assert all(metrics.errors.max_abs < 1e-4 for metrics in run.outputs)
    assert {probe.label for probe in run.probes} == {"bn0", "bn1", "bn2"}  # every fold's output is measured
    assert run.float64 is None  # the fast path: the plain comparison passed, nothing ran in float64
    assert report.responsible == ()


@pytest.mark.parametrize(("weight", "responsible", "downstream"), [("w1", "bn1", ("bn1", "bn2")), ("w0", "bn0", None)])
def test_perturbed_folded_weight_fails_and_names_the_fold(chain, weight, responsible, downstream):
    original, candidate, probes = chain
    report = verify(original, perturbed(candidate, weight), probes=probes)
    assert report.verdict is Verdict.FAILED
    (verdict,) = report.verdicts
    assert verdict.responsible == responsible
    # float64 basis: each fold is judged on its own, so only the wrong one diverges ...
    assert verdict.basis == "float64"
    assert verdict.divergent == (responsible,)
    if downstream is not None:  # ... while in the whole network its error reaches the later folds too
        failed = tuple(j.name for j in verdict.probes if j.verdict is Verdict.FAILED)
        assert failed == tuple(f"{label}_out" for label in downstream)
    assert f"first divergent fold: {responsible}" in verdict.reasons
    assert {probe.label for probe in report.runs[0].probes} == {"bn0", "bn1", "bn2"}
    assert report.responsible == (responsible,)


def test_upstream_folds_of_the_perturbed_one_do_not_diverge(chain):
    original, candidate, probes = chain
    report = verify(original, perturbed(candidate, "w2"), probes=probes)
    (verdict,) = report.verdicts
    assert verdict.divergent == ("bn2",)
    judged = {judgement.name: judgement.verdict for judgement in verdict.probes}
    assert judged == {"bn0_out": Verdict.PASSED, "bn1_out": Verdict.PASSED, "bn2_out": Verdict.FAILED}


def test_default_probes_are_the_batch_norm_outputs_both_models_produce(chain):
    original, candidate, _ = chain
    report = verify(original, perturbed(candidate, "w1"))
    assert report.responsible == ("bn1",)


def test_no_probes_means_no_attribution(chain):
    original, candidate, _ = chain
    report = verify(original, perturbed(candidate, "w1"), probes={})
    assert report.verdict is Verdict.FAILED
    assert report.responsible == ()
    assert report.runs[0].probes == ()


def test_probes_missing_from_a_model_are_noted(chain):
    original, candidate, probes = chain
    report = verify(original, perturbed(candidate, "w1"), probes={**probes, "not_a_tensor": "ghost"})
    assert report.responsible == ("bn1",)
    assert report.runs[0].probe_note == "not in both main graphs, not measured: not_a_tensor"


def test_difference_outside_the_folds_is_said_so(chain):
    original, candidate, probes = chain
    changed = onnx.ModelProto()
    changed.CopyFrom(candidate)
    identity = next(node for node in changed.graph.node if node.name == "output")
    identity.op_type = "Neg"  # the last op differs; every folded tensor still matches
    report = verify(original, changed, probes=probes)
    (verdict,) = report.verdicts
    assert verdict.verdict is Verdict.FAILED
    assert verdict.responsible is None
    assert any(
        reason.startswith("no probed fold diverges") and "arises outside the folded tensors" in reason
        for reason in verdict.reasons
    )


def test_accepts_paths_protos_and_ir_models(tmp_path, chain):
    original, candidate, _ = chain
    onnx.save(original, tmp_path / "original.onnx")
    report = verify(tmp_path / "original.onnx", ir.from_proto(candidate))
    assert report.verdict is Verdict.PASSED
    assert report.original == str(tmp_path / "original.onnx")
    assert report.candidate.startswith("<onnx_ir.Model")


def test_external_data_models_are_read_from_their_directory(tmp_path, chain, monkeypatch):
    original, candidate, _ = chain
    copy = onnx.ModelProto()
    copy.CopyFrom(candidate)  # onnx.save turns the saved proto's tensors into external references
    onnx.save(copy, tmp_path / "candidate.onnx", save_as_external_data=True, location="c.data", size_threshold=0)
    monkeypatch.chdir("/")  # onnxruntime must not rely on the working directory
    assert verify(original, tmp_path / "candidate.onnx").verdict is Verdict.PASSED
    loaded = ir.load(tmp_path / "candidate.onnx")  # lazy external tensors
    assert verify(original, loaded).verdict is Verdict.PASSED


def test_unreadable_model_is_an_invalid_model_error(tmp_path, chain):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(InvalidModelError, match=r"junk\.onnx"):
        verify(chain[0], tmp_path / "junk.onnx")
    with pytest.raises(InvalidModelError, match="no such file"):
        verify(tmp_path / "missing.onnx", chain[1])


def test_interface_differences_fail_without_running(chain):
    original, _, _ = chain
    other = single_op_model("Relu", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8], inputs=("image",))
    report = verify(original, other)
    assert report.verdict is Verdict.FAILED
    assert report.problems == ("the candidate lacks input(s) x", "the candidate needs extra input(s) image")
    assert report.runs == ()


def test_candidate_that_fails_to_run_is_a_failure_with_the_error(chain):
    original, candidate, _ = chain
    broken = onnx.ModelProto()
    broken.CopyFrom(candidate)
    conv = next(node for node in broken.graph.node if node.op_type == "Conv")
    conv.attribute.append(helper.make_attribute("group", 5))  # 3 input channels cannot split in 5 groups
    report = verify(original, broken)
    (run,) = report.runs
    assert report.verdict is Verdict.FAILED
    assert run.run_error is not None
    assert report.verdicts[0].reasons[0].startswith("the candidate failed on CPUExecutionProvider")


def test_original_failing_on_generated_inputs_is_a_usage_error_with_a_hint():
    model = single_op_model("Reshape", onnx.TensorProto.FLOAT, ["n"], inputs=("x", "shape"))
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    with pytest.raises(UsageError, match="--input-shapes"):
        verify(model, model)


def test_provider_names_are_case_insensitive():
    assert resolve_provider("CPU") == resolve_provider("cpu") == "CPUExecutionProvider"
    assert resolve_provider("Cuda") == "CUDAExecutionProvider"
    assert resolve_provider("cudaexecutionprovider") == "CUDAExecutionProvider"
    with pytest.raises(UsageError, match="unknown provider 'gpu'"):
        resolve_provider("gpu")


@pytest.mark.skipif(not CUDA_MISSING, reason="this onnxruntime has CUDA; the skip path needs a CPU-only build")
def test_unavailable_provider_is_skipped_never_passed(chain):
    original, candidate, _ = chain
    report = verify(original, candidate, providers=("cpu", "CUDA"))
    cpu, cuda = report.verdicts
    assert (cpu.verdict, cuda.verdict) == (Verdict.PASSED, Verdict.SKIPPED)
    assert report.verdict is Verdict.SKIPPED
    assert not report.passed and not report.failed
    assert report.skipped_providers == ("cuda",)
    assert "CUDAExecutionProvider is not available" in report.runs[1].skipped_reason
    only_cuda = verify(original, candidate, providers=["cuda"])
    assert only_cuda.verdict is Verdict.SKIPPED


@pytest.mark.skipif(not CUDA_MISSING, reason="this onnxruntime has CUDA; the skip path needs a CPU-only build")
def test_require_provider_raises_for_an_unavailable_provider(chain):
    original, candidate, _ = chain
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider is not available"):
        verify(original, candidate, providers=("cuda",), require_provider=True)


def test_unknown_output_in_a_tolerance_override_is_a_usage_error(chain):
    original, candidate, _ = chain
    with pytest.raises(UsageError, match="unknown output"):
        verify(original, candidate, atol={"logitz": 1.0})


def test_bnfold_fold_passes_and_its_records_name_the_probes():
    original = conv_bn_chain(3)
    candidate, probes = folded_by_bnfold(original)
    assert probes == {"bn0_out": "bn0", "bn1_out": "bn1", "bn2_out": "bn2"}
    assert verify(original, candidate, probes=probes).verdict is Verdict.PASSED
    weight = next(node for node in candidate.graph.node if node.name == "conv2").input[1]
    assert verify(original, perturbed(candidate, weight), probes=probes).responsible == ("bn2",)


def test_ir_model_with_external_tensors_from_two_directories(tmp_path, chain):
    original, candidate, _ = chain
    models = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        copy = onnx.ModelProto()
        copy.CopyFrom(candidate)
        onnx.save(copy, tmp_path / name / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
        models.append(ir.load(tmp_path / name / "m.onnx"))
    mixed, other = models
    mixed.graph.initializers["w0"].const_value = other.graph.initializers["w0"].const_value
    assert {str(v.const_value.base_dir) for v in mixed.graph.initializers.values()} == {
        str(tmp_path / "first"),
        str(tmp_path / "second"),
    }
    assert verify(original, mixed).verdict is Verdict.PASSED
