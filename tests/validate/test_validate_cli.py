"""Exit codes and outputs of `bnfold verify`, `bnfold check` and `bnfold doctor`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from validate_builders import conv_bn_chain, folded, perturbed

from bnfold.cli import main
from bnfold.validate import environment
from bnfold.validate.environment import Distribution

CUDA_MISSING = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    original = conv_bn_chain(2, second_output=True)
    candidate, _ = folded(original)
    paths = {
        "original": directory / "original.onnx",
        "folded": directory / "folded.onnx",
        "bad": directory / "bad.onnx",
    }
    onnx.save(original, paths["original"])
    onnx.save(candidate, paths["folded"])
    onnx.save(perturbed(candidate, "w1"), paths["bad"])
    (directory / "junk.onnx").write_bytes(b"garbage")
    paths["junk"] = directory / "junk.onnx"
    return {name: str(path) for name, path in paths.items()}


def test_verify_exit_0_on_pass(models, capsys):
    assert main(["verify", models["original"], models["folded"]]) == 0
    out = capsys.readouterr().out
    assert "verification passed" in out
    assert "max abs" in out and "atol" in out


def test_verify_exit_1_on_mismatch_names_the_fold(models, capsys):
    assert main(["verify", models["original"], models["bad"]]) == 1
    out = capsys.readouterr().out
    assert "responsible fold: bn1" in out
    assert "would pass with atol=" in out


def test_verify_exit_0_when_a_loose_override_passes(models):
    assert main(["verify", models["original"], models["bad"], "--atol", "1", "--rtol", "y:0.5"]) == 0


@pytest.mark.parametrize(
    "arguments",
    [
        ["--atol", "abc"],
        ["--atol", ":1e-3"],
        ["--rtol", "-1"],
        ["--iterations", "0"],
        ["--dim", "batch"],
        ["--input-shapes", "x"],
        ["--providers", "gpu"],
        ["--atol", "nosuchoutput:1"],
        ["--dim", "nosuchdim=3"],
        ["--load-inputs", "/nonexistent/inputs.npz"],
        ["--load-inputs", "inputs.npz", "--dim", "batch=2"],
        ["--seed", "-1"],
    ],
)
def test_verify_exit_2_on_usage_errors(models, arguments, capsys):
    assert main(["verify", models["original"], models["folded"], *arguments]) == 2
    assert capsys.readouterr().err.startswith("bnfold: error:")


def test_verify_exit_3_on_an_unreadable_model(models, capsys):
    assert main(["verify", models["original"], models["junk"]]) == 3
    err = capsys.readouterr().err
    assert "junk.onnx" in err and "Traceback" not in err


@pytest.mark.skipif(not CUDA_MISSING, reason="needs a CPU-only onnxruntime")
def test_verify_cuda_unavailable_is_skipped_with_exit_0_or_4_when_required(models, capsys):
    assert main(["verify", models["original"], models["folded"], "--providers", "cpu,CUDA"]) == 0
    assert "cuda SKIPPED" in capsys.readouterr().out
    assert main(["verify", models["original"], models["folded"], "--providers", "cuda", "--require-provider"]) == 4
    assert "CUDAExecutionProvider is not available" in capsys.readouterr().err


def test_verify_json_to_stdout_and_junit_file(models, tmp_path, capsys):
    junit = tmp_path / "verify.xml"
    code = main(["verify", models["original"], models["bad"], "--json", "-", "--junit-xml", str(junit)])
    assert code == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["outputs"] == ["y", "z"] and data["responsible"] == ["bn1"]
    assert "responsible fold" in captured.err  # the table goes to stderr when JSON takes stdout
    names = [case.get("name") for case in ElementTree.parse(junit).getroot().iter("testcase")]
    assert names == ["cpu/y", "cpu/z"]


def test_verify_save_and_load_inputs(models, tmp_path, capsys):
    inputs = tmp_path / "inputs.npz"
    report_a, report_b = tmp_path / "a.json", tmp_path / "b.json"
    arguments = ["verify", models["original"], models["folded"]]
    assert main([*arguments, "--seed", "3", "--save-inputs", str(inputs), "--json", str(report_a)]) == 0
    assert main([*arguments, "--load-inputs", str(inputs), "--json", str(report_b)]) == 0
    a, b = json.loads(report_a.read_text()), json.loads(report_b.read_text())
    assert a["providers"][0]["run"]["outputs"] == b["providers"][0]["run"]["outputs"]


def test_verify_github_summary(models, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["verify", models["original"], models["folded"]]) == 0
    assert "### bnfold verify: ✅ passed" in summary.read_text()


def test_check_exit_codes(models, capsys):
    assert main(["check", models["folded"]]) == 0
    assert "nothing to fold" in capsys.readouterr().out
    assert main(["check", models["folded"], models["original"]]) == 1
    out = capsys.readouterr().out
    assert "2 foldable BatchNormalization" in out and "bn0" in out and "bn1" in out
    assert main(["check", models["original"], models["junk"]]) == 3
    assert "junk.onnx" in capsys.readouterr().err
    assert main(["check", models["original"], "--only", "nosuchrule"]) == 2


def test_check_json_junit_and_summary(models, tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "check.xml"
    code = main(["check", models["original"], models["folded"], "--json", "-", "--junit-xml", str(junit)])
    assert code == 1
    data = json.loads(capsys.readouterr().out)
    assert data["foldable_total"] == 2
    assert [model["model"] for model in data["models"]] == [models["original"], models["folded"]]
    assert [record["node"] for record in data["models"][0]["foldable"]] == ["bn0", "bn1"]
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    assert [case.get("name") for case in cases] == [models["original"], models["folded"]]
    assert cases[0].find("failure") is not None and cases[1].find("failure") is None
    assert "| `" + models["original"] + "` | `bn0`, `bn1` | ❌ 2 foldable |" in summary.read_text()


def test_check_does_not_write_anything(models):
    path = Path(models["original"])
    before = sorted(path.parent.iterdir()), path.read_bytes()
    main(["check", models["original"]])
    assert (sorted(path.parent.iterdir()), path.read_bytes()) == before


def test_doctor_exit_0_and_reports_versions(capsys):
    assert main(["doctor", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in data["available_providers"]
    (cpu,) = [probe for probe in data["probes"] if probe["provider"] == "CPUExecutionProvider"]
    assert cpu["executed_by"] == "CPUExecutionProvider" and cpu["works"]
    assert data["problems"] == []


def test_doctor_flags_two_onnxruntime_distributions(monkeypatch, capsys):
    both = (Distribution("onnxruntime", "1.32.0"), Distribution("onnxruntime-gpu", "1.32.0"))
    monkeypatch.setattr(environment, "onnxruntime_distributions", lambda: both)
    assert main(["doctor"]) == 1
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are installed together" in capsys.readouterr().out


@pytest.mark.skipif(not CUDA_MISSING, reason="needs a CPU-only onnxruntime")
def test_doctor_exit_4_when_a_named_provider_does_not_execute(capsys):
    assert main(["doctor", "--providers", "cuda"]) == 4
    assert "CUDAExecutionProvider is not available" in capsys.readouterr().out


def test_pre_commit_hook_runs_bnfold_check_on_onnx_files(models):
    yaml = pytest.importorskip("yaml")
    hooks = yaml.safe_load((Path(__file__).parents[2] / ".pre-commit-hooks.yaml").read_text())
    (hook,) = [hook for hook in hooks if hook["id"] == "bnfold-check"]
    assert hook["files"] == r"\.onnx$"
    program, *arguments = hook["entry"].split()
    assert program == "bnfold"
    assert main([*arguments, models["original"]]) == 1
    assert main([*arguments, models["folded"]]) == 0
