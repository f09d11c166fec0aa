"""Initializers also listed as graph inputs (IR >= 4): named skip reasons, and the opt-in that freezes them.

Since IR 4 such an initializer is an overridable default, so the fold leaves BNs that read one
(``BN_PARAMS_ARE_GRAPH_INPUTS``, ``WEIGHT_IS_GRAPH_INPUT``). ``freeze_initializer_inputs`` (CLI
``--freeze-initializer-inputs``) removes them from the graph inputs first (``passes/freeze_initializer_inputs.py``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from rules_helpers import assert_equivalent, assert_folded, assert_skipped, fold_proto, only_record, op_types

from bnfold.cli import main
from bnfold.passes import FoldBatchNormPass, SkipReason
from bnfold.passes.freeze_initializer_inputs import FreezeInitializerInputsPass
from bnfold.workflow import FoldOptions

PARAMS = ("gamma", "beta", "mean", "var")


def conv_bn(listed: tuple[str, ...], *, ir_version: int = 8, runtime: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Conv(X, W, B) → BN; the initializers named in ``listed`` are also graph inputs, those in ``runtime`` are
    graph inputs without an initializer (true runtime inputs)."""
    rng = np.random.default_rng(0)
    arrays = {
        "W": (rng.standard_normal((6, 4, 3, 3)) * 0.5).astype(np.float32),
        "B": rng.standard_normal(6).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 6).astype(np.float32),
        "beta": rng.standard_normal(6).astype(np.float32),
        "mean": rng.standard_normal(6).astype(np.float32),
        "var": rng.uniform(0.2, 2.0, 6).astype(np.float32),
    }
    inputs = [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 4, 6, 6])]
    for name in (*listed, *runtime):
        inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(arrays[name].shape)))
    initializers = [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items() if n not in runtime]
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv_out", *PARAMS], ["Y"], name="bn"),
    ]
    output = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 6, 6, 6])
    graph = helper.make_graph(nodes, "g", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def input_names(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.input]


def test_skips_when_bn_params_are_graph_inputs() -> None:
    original = conv_bn(("gamma", "var"))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.BN_PARAMS_ARE_GRAPH_INPUTS)
    assert "scale 'gamma'" in record.detail and "var 'var'" in record.detail and "'beta'" not in record.detail
    assert "--freeze-initializer-inputs" in record.detail
    assert op_types(folded) == ["Conv", "BatchNormalization"]
    assert report.frozen_inputs == ()


@pytest.mark.parametrize("name", ["W", "B"])
def test_skips_when_weight_is_graph_input(name: str) -> None:
    folded, report = fold_proto(conv_bn((name,)))
    record = only_record(report)
    assert_skipped(record, SkipReason.WEIGHT_IS_GRAPH_INPUT)
    assert repr(name) in record.detail
    assert op_types(folded) == ["Conv", "BatchNormalization"]


def test_skips_when_bn_params_not_constant_with_a_true_runtime_input() -> None:
    """One parameter is fed at run time (no initializer at all): that is the reason, not the overridable one."""
    folded, report = fold_proto(conv_bn(("gamma",), runtime=("mean",)))
    assert_skipped(only_record(report), SkipReason.BN_PARAMS_NOT_CONSTANT)
    assert op_types(folded) == ["Conv", "BatchNormalization"]


def test_folds_when_initializer_inputs_are_frozen() -> None:
    original = conv_bn(("W", "B", *PARAMS))
    folded, report = fold_proto(original, options=FoldOptions(freeze_initializer_inputs=True))
    assert_folded(only_record(report), "conv")
    assert report.frozen_inputs == ("W", "B", *PARAMS)
    assert report.to_dict()["frozen_inputs"] == ["W", "B", *PARAMS]
    assert input_names(folded) == ["X"]
    assert op_types(folded) == ["Conv"]
    assert_equivalent(original, folded, np.float32)  # fed X only: the defaults are what the original uses


def test_freeze_keeps_true_runtime_inputs() -> None:
    model = ir.from_proto(conv_bn(("W",), runtime=("mean",)))
    result = FreezeInitializerInputsPass()(model)
    assert result.frozen == ("W",)
    assert result.modified
    assert [value.name for value in model.graph.inputs] == ["X", "mean"]


def test_freeze_leaves_ir3_models_alone() -> None:
    """In IR 3 every initializer must be an input, and each already counts as a constant: nothing to freeze."""
    listed = ("W", "B", *PARAMS)
    model = ir.from_proto(conv_bn(listed, ir_version=3))
    fold_pass = FoldBatchNormPass(freeze_initializer_inputs=True)
    fold_pass(model)
    assert fold_pass.report.frozen_inputs == ()
    assert len(fold_pass.report.folded) == 1
    # W and B were rewritten in place and stay listed (IR 3 requires it); the fold removed the BN parameters.
    assert [value.name for value in model.graph.inputs] == ["X", "W", "B"]


def test_cli_flag_freezes_and_the_verification_passes(tmp_path, capsys) -> None:
    source, output = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn(("W", "B", *PARAMS)), source)
    assert main([str(source), "-o", str(output), "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fold"]["skipped_by_reason"] == {"BN_PARAMS_ARE_GRAPH_INPUTS": 1}

    assert main([str(source), "-o", str(output), "--freeze-initializer-inputs", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fold"]["batch_norm_folded"] == 1
    assert document["fold"]["frozen_inputs"] == ["W", "B", *PARAMS]
    assert document["verify"]["verdict"] == "passed"  # the folded model has fewer inputs than the original
    assert input_names(onnx.load(output)) == ["X"]
