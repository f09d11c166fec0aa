"""JSON, JUnit XML and the GitHub step summary contain every output and parse."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import onnxruntime as ort
import pytest
from validate_builders import conv_bn_chain, folded, perturbed

from bnfold.validate import VerifyReport, verify
from bnfold.validate.github_summary import append_step_summary, step_summary_path, verify_markdown
from bnfold.validate.junit import JUnitCase, JUnitSuite, junit_xml, verify_cases, write_junit_xml

CUDA_MISSING = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def failing_report() -> VerifyReport:
    original = conv_bn_chain(2, second_output=True)
    candidate, probes = folded(original)
    return verify(original, perturbed(candidate, "w1"), probes=probes, providers=("cpu", "cuda"))


def test_json_parses_and_holds_every_output(failing_report):
    data = json.loads(failing_report.to_json())
    assert data["verdict"] == "failed"
    assert data["outputs"] == ["y", "z"]
    assert data["responsible"] == ["bn1"]
    cpu = data["providers"][0]
    assert [output["name"] for output in cpu["run"]["outputs"]] == ["y", "z"]
    assert [output["name"] for output in cpu["verdict"]["outputs"]] == ["y", "z"]
    assert cpu["verdict"]["outputs"][0]["verdict"] == "failed"
    assert set(cpu["run"]["outputs"][0]["errors"]) >= {"max_abs", "mean_abs", "p99_abs", "max_rel", "p99_rel"}
    assert cpu["verdict"]["outputs"][0]["required_atol"] > 0
    assert "Infinity" not in failing_report.to_json() and "NaN" not in failing_report.to_json()


def test_json_round_trip_keeps_verdicts(failing_report):
    again = VerifyReport.from_json(failing_report.to_json())
    assert again == failing_report
    assert again.to_dict() == failing_report.to_dict()


@pytest.mark.skipif(not CUDA_MISSING, reason="needs a CPU-only onnxruntime for the skipped cases")
def test_junit_has_one_case_per_provider_and_output(tmp_path, failing_report):
    write_junit_xml(tmp_path / "report.xml", [JUnitSuite("bnfold verify", verify_cases(failing_report))])
    root = ElementTree.parse(tmp_path / "report.xml").getroot()
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "2")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"cpu/y", "cpu/z", "cuda/y", "cuda/z"}
    failure = cases["cpu/y"].find("failure")
    assert "first divergent fold: bn1" in failure.get("message")
    assert cases["cpu/z"].find("failure") is None and cases["cpu/z"].find("skipped") is None
    assert "CUDAExecutionProvider is not available" in cases["cuda/y"].find("skipped").get("message")


def test_junit_interface_problem_is_one_failing_case():
    original = conv_bn_chain(1)
    other = conv_bn_chain(1)
    other.graph.input[0].name = "image"
    other.graph.node[0].input[0] = "image"
    report = verify(original, other)
    (case,) = verify_cases(report)
    assert (case.name, case.failure) == ("interface", report.problems[0] + "; " + report.problems[1])


def test_junit_escapes_markup():
    text = junit_xml([JUnitSuite("s", (JUnitCase("model<&>", "cpu/y", failure='a "b" <c>'),))])
    case = ElementTree.fromstring(text.split("?>", 1)[1]).find("testsuite/testcase")
    assert case.get("classname") == "model<&>"
    assert case.find("failure").text == 'a "b" <c>'


def test_markdown_summary_lists_every_output_and_the_responsible_fold(failing_report):
    markdown = verify_markdown(failing_report)
    assert "❌ failed" in markdown
    assert "| cpu | `y` |" in markdown and "| cpu | `z` |" in markdown
    assert "first divergent fold **bn1**" in markdown


def test_step_summary_is_written_only_under_github_actions(tmp_path):
    summary = tmp_path / "summary.md"
    assert step_summary_path({"GITHUB_STEP_SUMMARY": str(summary)}) is None
    assert not append_step_summary("x", {"GITHUB_ACTIONS": "false", "GITHUB_STEP_SUMMARY": str(summary)})
    assert not summary.exists()
    environ = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    assert append_step_summary("first", environ) and append_step_summary("second", environ)
    assert summary.read_text() == "first\n\nsecond\n\n"
    assert not append_step_summary("x", {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path)})
