"""The fold as a plug-in: inside an onnx_ir PassManager, after torch's dynamo exporter, before quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from onnx import helper
from rules_helpers import assert_equivalent, bn_arrays, bn_node, io, make_model, op_types, session

import bnfold
from bnfold.passes import DEFAULT_RULES, FoldBatchNormPass, rule_names, select_rules
from bnfold.passes.rule import ForwardFoldRule
from bnfold.report import FoldStatus

F32 = np.float32


def gemm_and_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {
        "W": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(F32),
        "B": rng.standard_normal((4, 5)).astype(F32),
        **bn_arrays(4, F32, "bn_conv"),
        **bn_arrays(5, F32, "bn_gemm", seed=1),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        bn_node("c", "Y", prefix="bn_conv"),
        helper.make_node("Gemm", ["V", "B"], ["g"], name="gemm", beta=2.0),
        bn_node("g", "Z", prefix="bn_gemm"),
    ]
    inputs = [io("X", F32, [1, 3, 6, 6]), io("V", F32, [2, 4])]
    return make_model(nodes, inputs, [io("Y", F32, [1, 4, 4, 4]), io("Z", F32, [2, 5])], arrays)


def test_every_rule_has_its_own_module_and_a_unique_name():
    # A newcomer finds any rule from the file list alone: rule ``x`` lives in ``passes/x.py``.
    names = rule_names()
    assert len(set(names)) == len(names), names
    passes_dir = Path(bnfold.passes.__file__).parent
    assert [name for name in names if not (passes_dir / f"{name}.py").is_file()] == []
    assert {"conv", "conv_transpose", "gemm", "matmul", "forward_conv"} <= set(names)


def test_backward_rules_come_before_forward_rules():
    kinds = [isinstance(rule, ForwardFoldRule) for rule in DEFAULT_RULES]
    assert kinds == sorted(kinds), rule_names()


def test_rule_selection_keeps_registry_order():
    skipped = [rule.name for rule in select_rules(DEFAULT_RULES, skip=["conv", "matmul"])]
    assert skipped == [name for name in rule_names() if name not in ("conv", "matmul")]
    assert "conv_transpose" in skipped and "forward_conv" in skipped
    assert [rule.name for rule in select_rules(DEFAULT_RULES, only=["forward_conv", "gemm"])] == [
        "gemm",
        "forward_conv",
    ]
    with pytest.raises(ValueError, match="unknown rule"):
        select_rules(DEFAULT_RULES, only=["lower_standalone"])


def test_folds_inside_an_onnx_ir_pass_manager():
    original = gemm_and_conv_model()
    model = ir.serde.deserialize_model(original)
    fold_pass = FoldBatchNormPass(skip=["conv"])
    manager = ir.passes.PassManager([fold_pass, common_passes.RemoveUnusedNodesPass()])
    result = manager(model)
    assert result.modified
    assert [(r.node, r.status, r.rule) for r in fold_pass.report.records] == [
        ("bn_conv", FoldStatus.SKIPPED, None),
        ("bn_gemm", FoldStatus.FOLDED, "gemm"),
    ]
    folded = ir.to_proto(result.model)
    assert op_types(folded) == ["Conv", "BatchNormalization", "Gemm"]
    assert_equivalent(original, folded, F32)


def test_fold_pass_reports_not_modified_when_nothing_folds():
    model = ir.serde.deserialize_model(gemm_and_conv_model())
    result = FoldBatchNormPass(only=["matmul"])(model)
    assert not result.modified
    assert len(result.report.skipped) == 2


def torch_linear_and_conv_net():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn2d = torch.nn.BatchNorm2d(8)
            self.linear = torch.nn.Linear(8, 5)
            self.bn1d = torch.nn.BatchNorm1d(5)

        def forward(self, x):
            features = self.bn2d(self.conv(x)).relu().mean(dim=(2, 3))
            return self.bn1d(self.linear(features))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for module in (net.bn2d, net.bn1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
    return torch, net


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_folds_the_model_returned_by_the_torch_dynamo_exporter():
    torch, net = torch_linear_and_conv_net()
    x = torch.randn(2, 3, 8, 8)
    # optimize=False keeps BatchNormalization: the exporter's own optimizer would fuse it silently.
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    original = ir.to_proto(program.model)
    assert op_types(original).count("BatchNormalization") == 2
    folded_model, report = bnfold.fold(program.model)  # in place: program.model is now folded
    assert folded_model is program.model
    assert [(r.producer, r.rule, r.folded) for r in report.records] == [("Conv", "conv", True), ("Gemm", "gemm", True)]
    folded = ir.to_proto(program.model)
    assert "BatchNormalization" not in op_types(folded)
    feeds = {original.graph.input[0].name: x.numpy()}
    assert_equivalent(original, folded, F32, feeds)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(session(folded).run(None, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_folded_model_goes_through_onnxruntime_quantisation_preprocessing(tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization.shape_inference")
    original = gemm_and_conv_model()
    folded_model, report = bnfold.fold(original)
    assert len(report.folded) == 2
    folded_path, prepared_path = tmp_path / "folded.onnx", tmp_path / "prepared.onnx"
    bnfold.files.save_model(folded_model, folded_path)
    quantization.quant_pre_process(str(folded_path), str(prepared_path))
    prepared = onnx.load(str(prepared_path))
    assert "BatchNormalization" not in op_types(prepared)
    assert_equivalent(original, prepared, F32)


def test_cli_lists_and_selects_rules(tmp_path, capsys):
    cli = pytest.importorskip("bnfold.cli")
    assert cli.main(["fold", "--list-rules"]) == 0
    assert capsys.readouterr().out.split() == list(rule_names())
    model_path, folded_path, report_path = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(gemm_and_conv_model(), model_path)
    assert cli.main(["fold", str(model_path), "--only", "nonsense"]) == 2
    arguments = ["fold", str(model_path), "-o", str(folded_path), "--skip", "gemm", "--json", str(report_path)]
    assert cli.main(arguments) == 0
    records = {r["node"]: r for r in json.loads(report_path.read_text())["fold"]["records"]}
    assert (records["bn_conv"]["status"], records["bn_conv"]["rule"]) == ("folded", "conv")
    assert (records["bn_gemm"]["status"], records["bn_gemm"]["reason"]) == ("skipped", "RULE_DISABLED")
    assert op_types(onnx.load(folded_path)) == ["Conv", "Gemm", "BatchNormalization"]
