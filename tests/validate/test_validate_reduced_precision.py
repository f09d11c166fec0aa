"""QA defects D1, D10, D11b of the verifier.

- D1: in float16, the tolerance table (1e-2 + 1e-2·|ref|) absorbs a wrong fold (one folded weight row × 1.01
  or × 1.02 here; × 1.05 in the QA's face head, 11 % off on that feature), so for float16/bfloat16 tensors
  the float64 rule decides even when the table passes, with a floor derived from the type (one ulp of ``|t|``),
  not the table's.
- D10: an original that onnxruntime rejects on the very shapes it declares is an invalid model (exit 3).
- D11b: when a forward fold and a backward fold write one weight, a divergence at the probe names both.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.errors import InvalidModelError, UsageError
from bnfold.validate import Verdict, VerifyReport, verify
from bnfold.validate.tolerances import Float64Rule, Tolerance
from models.build import Variant, export_variant
from models.export import Exporter
from models.zoo import zoo_entry

# The face head: ``BatchNorm2d → Dropout → Flatten → Linear → BatchNorm1d``: the Linear's weight is written by
# the BatchNorm2d's forward fold (columns) and the BatchNorm1d's backward fold (rows).
FORWARD_BN = "/output_layer/output_layer.0/BatchNormalization"
BACKWARD_BN = "/output_layer/output_layer.4/BatchNormalization"
SHARED_WEIGHT = "output_layer.3.weight"


@functools.cache
def _face_head(dtype: str) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, str]]:
    original = ir.to_proto(export_variant(zoo_entry("face_head"), Variant(Exporter.TORCHSCRIPT, 17, dtype)))
    folded, report = bnfold.fold(original)
    return original, ir.to_proto(folded), report.probe_tensors()


def _row_scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` with row 0 of initializer ``name`` scaled by ``factor`` (one output feature)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, tensor in enumerate(copy.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            array[0] *= factor
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(tensor_dtype(tensor)), name))
            return copy
    raise KeyError(name)


def tensor_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(tensor.data_type)


def test_folds_fp16_face_head_and_the_float64_rule_passes_it():
    original, folded, probes = _face_head("float16")
    report = verify(original, folded, probes=probes)
    (run,), (verdict,) = report.runs, report.verdicts
    assert report.verdict is Verdict.PASSED
    assert verdict.basis == "float64"  # decided by float64, though the table passed
    assert all(judgement.verdict is Verdict.PASSED for judgement in verdict.outputs)
    assert run.float64 is not None and run.float64.unavailable is None
    (output,) = run.float64.outputs
    assert output.dtype == "float16"
    # a correct fold: within the rule's 4× (measured: ~1.9× the original's distance)
    assert output.candidate.errors.max_abs <= 4 * output.original.errors.max_abs
    assert all(judgement.verdict is Verdict.PASSED for judgement in verdict.float64_probes)
    assert VerifyReport.from_json(report.to_json()) == report


def test_fp16_wrong_fold_fails_although_the_table_passes_and_names_both_folds():
    """D1: one folded weight row × 1.01 fits fp16's 1e-2/1e-2 table (so does × 1.02), not the float64 rule."""
    original, folded, probes = _face_head("float16")
    bad = _row_scaled(folded, SHARED_WEIGHT, 1.01)
    table_only = verify(original, bad, probes=probes, float64=False)
    assert table_only.verdict is Verdict.PASSED  # the blind spot the float64 rule closes
    report = verify(original, bad, probes=probes)
    (run,), (verdict,) = report.runs, report.verdicts
    assert report.verdict is Verdict.FAILED
    assert verdict.basis == "float64"
    assert verdict.responsible == BACKWARD_BN
    assert verdict.responsible_folds == (FORWARD_BN, BACKWARD_BN)
    assert report.responsible == (FORWARD_BN, BACKWARD_BN)
    fold = next(truth for truth in run.float64.probes if truth.label == BACKWARD_BN)
    assert fold.scope == "fold"
    # measured: ~10× the original's distance at the fold (correct folds of this model: 1.0-1.7×)
    assert fold.candidate.errors.max_abs > 6 * fold.original.errors.max_abs
    assert any(f"{FORWARD_BN}, {BACKWARD_BN} all write" in reason for reason in verdict.reasons)


def test_fp32_correct_fold_keeps_the_fast_path():
    original, folded, probes = _face_head("float32")
    report = verify(original, folded, probes=probes)
    (run,), (verdict,) = report.runs, report.verdicts
    assert report.verdict is Verdict.PASSED
    assert verdict.basis == "float32"
    assert run.float64 is None  # no float64 run when the float32 table passes


def test_fp32_divergence_at_a_weight_two_folds_write_names_both():
    """D11b: the shared weight's error shows at the backward fold's output; the forward fold wrote it too."""
    original, folded, probes = _face_head("float32")
    report = verify(original, _row_scaled(folded, SHARED_WEIGHT, 1.01), probes=probes)
    (verdict,) = report.verdicts
    assert report.verdict is Verdict.FAILED
    assert verdict.responsible == BACKWARD_BN
    assert verdict.responsible_folds == (FORWARD_BN, BACKWARD_BN)
    assert VerifyReport.from_json(report.to_json()).responsible == (FORWARD_BN, BACKWARD_BN)


def test_fp32_divergence_in_a_fold_of_its_own_names_only_that_fold():
    original, folded, probes = _face_head("float32")
    first = "/trunk/trunk.1/BatchNormalization"
    conv = next(n for n in folded.graph.node if n.output[0] == f"{first}_output_0")
    report = verify(original, _row_scaled(folded, conv.input[1], 1.01), probes=probes)
    assert report.verdict is Verdict.FAILED
    assert report.verdicts[0].responsible_folds == (first,)
    assert report.responsible == (first,)


def test_reduced_precision_floor_is_the_types_ulp_not_the_table():
    rule = Float64Rule()
    table = Tolerance(atol=1e-2, rtol=1e-2)
    assert rule.floor("float16", table) == Tolerance(atol=0.0, rtol=2.0**-10)
    assert rule.floor("bfloat16", table) == Tolerance(atol=0.0, rtol=2.0**-7)
    assert rule.floor("float32", table) == table


def _conv_with_2d_bias(batch: int | str) -> onnx.ModelProto:
    """``Conv`` whose bias has shape [6, 2] (as torch 2.13's raw dynamo export writes for a bias-less Conv3d):
    onnxruntime loads it and fails when it runs."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "bad_bias",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.ones((6, 3, 3, 3), np.float32), "w"),
            numpy_helper.from_array(np.zeros((6, 2), np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_original_failing_on_its_declared_shapes_is_an_invalid_model(tmp_path):
    """D10: nothing about generated floating inputs of fixed declared shapes can be wrong: the model is."""
    model = _conv_with_2d_bias(2)
    with pytest.raises(InvalidModelError, match="fixed shapes it declares"):
        verify(model, model)
    path = tmp_path / "bad_bias.onnx"
    onnx.save(model, path)
    assert main(["verify", str(path), str(path), "-q"]) == 3
    assert main([str(path), "-o", str(tmp_path / "out.onnx"), "-q"]) == 3
    assert not (tmp_path / "out.onnx").exists()


def test_original_failing_on_a_dim_bnfold_chose_stays_a_usage_error():
    with pytest.raises(UsageError, match="--input-shapes"):
        verify(_conv_with_2d_bias("batch"), _conv_with_2d_bias("batch"))
