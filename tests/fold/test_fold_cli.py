"""The ``bnfold [fold] MODEL`` command: outputs, flags, JSON, external data, exit codes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from xml.etree import ElementTree

import onnx
import pytest
from fold_builders import ConvBN, assert_equivalent, op_types

from bnfold.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(ConvBN().build(), path)
    return path


def test_writes_stem_folded_onnx_beside_the_input(model_path, capsys):
    before = model_path.read_bytes()
    assert main([str(model_path), "--no-verify"]) == 0
    output = model_path.with_name("net.folded.onnx")
    assert op_types(onnx.load(output)) == ["Conv"]
    assert model_path.read_bytes() == before
    printed = capsys.readouterr().out
    assert "BatchNormalization folded" in printed and "1 / 1" in printed


def test_fold_subcommand_and_output_option(model_path, tmp_path):
    output = tmp_path / "out" / "x.onnx"
    output.parent.mkdir()
    assert main(["fold", str(model_path), "-o", str(output), "--no-verify", "-q"]) == 0
    assert_equivalent(onnx.load(model_path), onnx.load(output))
    assert sorted(p.name for p in output.parent.iterdir()) == ["x.onnx"]  # no temporary leftovers


def test_output_equal_to_input_is_a_usage_error(model_path, capsys):
    before = model_path.read_bytes()
    assert main([str(model_path), "-o", str(model_path), "--no-verify"]) == 2
    assert "--in-place" in capsys.readouterr().err
    assert model_path.read_bytes() == before


def test_in_place_replaces_the_input(model_path):
    original = onnx.load(model_path)
    assert main([str(model_path), "--in-place", "--no-verify", "-q"]) == 0
    assert op_types(onnx.load(model_path)) == ["Conv"]
    assert_equivalent(original, onnx.load(model_path))
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["net.onnx"]


def test_json_report_to_stdout(model_path, capsys):
    assert main([str(model_path), "--no-verify", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fold"]["batch_norm_total"] == 1
    assert document["fold"]["batch_norm_folded"] == 1
    assert document["fold"]["records"][0]["status"] == "folded"
    assert document["fold"]["records"][0]["rule"] == "conv"
    assert document["size_before"] > 0 and document["size_after"] > 0


def test_json_report_to_file_lists_skip_reasons(tmp_path):
    path = tmp_path / "train.onnx"
    onnx.save(ConvBN(opset=15, bn_attributes={"training_mode": 1}).build(), path)
    report = tmp_path / "report.json"
    assert main([str(path), "--no-verify", "-q", "--json", str(report)]) == 0
    document = json.loads(report.read_text())
    assert document["fold"]["skipped_by_reason"] == {"TRAINING_MODE": 1}
    assert document["fold"]["records"][0]["reason"] == "TRAINING_MODE"


def test_external_data_input_is_written_with_external_data(tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    source = source_dir / "big.onnx"
    spec = ConvBN(in_channels=16, out_channels=16)
    model = spec.build()
    onnx.save(spec.build(), source, save_as_external_data=True, location="big.weights", size_threshold=64)
    output = tmp_path / "big.folded.onnx"
    assert main([str(source), "-o", str(output), "--no-verify", "-q"]) == 0
    assert (tmp_path / "big.folded.onnx.data").is_file()
    folded = onnx.load(output)  # loads its external data from beside the output
    assert op_types(folded) == ["Conv"]
    assert_equivalent(model, folded)


def _external_model(directory):
    source = directory / "big.onnx"
    spec = ConvBN(in_channels=16, out_channels=16)
    onnx.save(spec.build(), source, save_as_external_data=True, location="big.weights", size_threshold=64)
    return source


def _files(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@pytest.mark.parametrize("spelling", ["big.weights", "./big.weights", "link.weights"])
def test_output_naming_the_inputs_external_data_file_is_a_usage_error(tmp_path, capsys, spelling):
    source = _external_model(tmp_path)
    (tmp_path / "link.weights").symlink_to(tmp_path / "big.weights")
    before = _files(tmp_path)
    assert main([str(source), "-o", str(tmp_path / spelling), "--no-verify", "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("bnfold: error:") and "a file the model is read from" in error and "\n" not in error
    assert _files(tmp_path) == before  # input and its data untouched, no output, no staging directory left


@pytest.mark.parametrize("where", ["missing/report.json", "."])
def test_unwritable_json_path_is_refused_before_the_output_is_written(model_path, tmp_path, capsys, where):
    output = tmp_path / "out.onnx"
    target = str(tmp_path / where)
    assert main([str(model_path), "-o", str(output), "--no-verify", "-q", "--json", target]) == 2
    assert "--json" in capsys.readouterr().err
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_list_rules(capsys):
    assert main(["--list-rules"]) == 0
    rules = capsys.readouterr().out.split()
    assert "conv" in rules and "conv_transpose" in rules


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        (["missing.onnx", "--no-verify"], 3),
        (["--only", "nope", "{model}", "--no-verify"], 2),
        (["{model}", "--in-place", "-o", "x.onnx", "--no-verify"], 2),
        (["fold", "--no-such-flag"], 2),
    ],
)
def test_exit_codes(arguments, code, model_path, capsys):
    arguments = [a.replace("{model}", str(model_path)) for a in arguments]
    assert main(arguments) == code
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and err.count("\n") == 1


def test_python_dash_m_entry_point(model_path):
    result = subprocess.run(
        [sys.executable, "-m", "bnfold", str(model_path), "--no-verify", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert model_path.with_name("net.folded.onnx").is_file()


def test_lower_standalone_replaces_an_unfoldable_bn_by_mul_add(tmp_path, capsys):
    model = ConvBN().build()
    model.graph.node.insert(1, onnx.helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"))
    model.graph.node[2].input[0] = "relu_out"
    source, output = tmp_path / "relu.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    assert main([str(source), "-o", str(output), "--lower-standalone", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fold"]["batch_norm_lowered"] == 1
    assert document["fold"]["records"][0]["status"] == "lowered"
    assert document["verify"]["verdict"] == "passed"
    assert op_types(onnx.load(output)) == ["Conv", "Relu", "Mul", "Add"]


@pytest.fixture
def broken_conv_rule(monkeypatch):
    """Make the conv rule fold wrong weights (×1.1), as a fold bug would."""
    from bnfold.passes import conv

    original_plan = conv.ConvRule.plan

    def wrong_plan(self, producer, affine, constants):
        plan = original_plan(self, producer, affine, constants)
        weight, *rest = plan.updates
        return dataclasses.replace(plan, updates=(dataclasses.replace(weight, values=weight.values * 1.1), *rest))

    monkeypatch.setattr(conv.ConvRule, "plan", wrong_plan)


@pytest.mark.usefixtures("broken_conv_rule")
def test_a_fold_that_fails_verification_is_never_written(model_path, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    assert main([str(model_path), "-o", str(output), "--json", "-"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["output"] is None
    assert document["verify"]["verdict"] == "failed"
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


@pytest.mark.usefixtures("broken_conv_rule")
def test_keep_failed_keeps_the_failing_fold_under_another_name(model_path, tmp_path):
    output = tmp_path / "out.onnx"
    assert main([str(model_path), "-o", str(output), "--keep-failed", "-q"]) == 1
    assert not output.exists()
    assert op_types(onnx.load(tmp_path / "out.failed.onnx")) == ["Conv"]


def test_junit_xml_has_one_testcase_per_provider_and_output(model_path, tmp_path):
    junit = tmp_path / "fold.xml"
    assert main([str(model_path), "-o", str(tmp_path / "out.onnx"), "-q", "--junit-xml", str(junit)]) == 0
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcomes = [(case.get("name"), [child.tag for child in case if child.tag != "system-out"]) for case in cases]
    assert outcomes == [("cpu/Y", [])]  # passed: no <failure>, <error> or <skipped>


def test_model_without_batch_norm_says_why_and_what_to_do(tmp_path, capsys):
    model = ConvBN().build()
    bn = model.graph.node[1]
    model.graph.node.remove(bn)
    model.graph.node[0].output[0] = bn.output[0]  # Conv writes Y: a model already fused by its exporter
    source = tmp_path / "fused.onnx"
    onnx.save(model, source)
    assert main([str(source), "-o", str(tmp_path / "out.onnx"), "--no-verify"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "0 / 0" in printed
    assert "has no BatchNormalization" in printed and "fuse Conv+BN" in printed
    assert "training=torch.onnx.TrainingMode.PRESERVE" in printed and "optimize=False" in printed
