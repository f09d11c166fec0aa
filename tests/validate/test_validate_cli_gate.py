"""The CLI as a CI gate (issue 15): a failure says why even with ``-q``, logs never truncate names, ``check
--fail-on-any-bn``, ``--timeout`` and progress lines, per-command exit codes, the fold step summary, and the
README's recalibration snippet run verbatim."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from validate_builders import conv_bn_chain, folded, perturbed

import bnfold
from bnfold.cli import main
from bnfold.cli import verify_options as verify_options_module

ROOT = Path(__file__).resolve().parents[2]
LONG = "encoder/" * 20  # a 160-character prefix: any truncation at 80 columns would cut it


@pytest.fixture
def chain_files(tmp_path):
    original = conv_bn_chain(3)
    candidate, _ = folded(original)
    paths = {
        "original": tmp_path / "model.onnx",
        "good": tmp_path / "good.onnx",
        "bad": tmp_path / "bad.onnx",
    }
    onnx.save(original, paths["original"])
    onnx.save(candidate, paths["good"])
    onnx.save(perturbed(candidate, "w1"), paths["bad"])
    return paths


def long_named_model(path: Path) -> list[str]:
    """``conv_bn_chain`` with 160+-character BN names; returns them."""
    model = conv_bn_chain(3)
    names = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.name = f"{LONG}{node.name}/BatchNormalization"
            names.append(node.name)
    onnx.save(model, path)
    return names


def test_verify_failure_says_why_on_stderr_even_when_quiet(chain_files, capsys):
    code = main(["verify", "-q", str(chain_files["original"]), str(chain_files["bad"])])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"bnfold: {chain_files['bad']} against {chain_files['original']}: verification failed:")
    assert "first divergent fold: bn1" in line


def test_verify_pass_is_silent_when_quiet(chain_files, capsys):
    assert main(["verify", "-q", str(chain_files["original"]), str(chain_files["good"])]) == 0
    assert capsys.readouterr() == ("", "")


def test_fold_failure_says_what_failed_and_that_nothing_was_written(chain_files, capsys):
    output = chain_files["original"].with_name("out.onnx")
    code = main(["-q", str(chain_files["original"]), "-o", str(output), "--atol", "0", "--rtol", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert not output.exists()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"bnfold: {chain_files['original']}: verification failed: cpu: output(s) y differ")
    assert line.endswith("; nothing was written")


def test_failed_fold_header_does_not_name_an_unwritten_file(chain_files, capsys):
    output = chain_files["original"].with_name("out.onnx")
    main([str(chain_files["original"]), "-o", str(output), "--atol", "0", "--rtol", "0"])
    out = capsys.readouterr().out
    assert f"verify: {output} against" not in out
    assert f"verify: the folded model (not written to {output}) against" in out


def test_non_terminal_log_never_truncates_bn_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    names = long_named_model(tmp_path / "long.onnx")
    assert main(["-v", str(tmp_path / "long.onnx"), "-o", str(tmp_path / "long.folded.onnx")]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out
    assert "…" not in out


def test_piped_cli_with_80_columns_shows_every_name_whole(tmp_path):
    """``COLUMNS=80 bnfold -v MODEL | cat``, literally: stdout is a pipe."""
    names = long_named_model(tmp_path / "long.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "bnfold", "-v", str(tmp_path / "long.onnx"), "--no-verify"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "80", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in names)
    assert not re.search(r"\x1b\[3[0-9]m", result.stdout)  # NO_COLOR (and no terminal): no colour codes


def test_check_fail_on_any_bn_lists_each_remaining_bn_with_its_reason(tmp_path, capsys):
    # a BN on the graph input: no producer to fold into, so it stays with a reason
    values = zip("sbmv", (1.5, 0.1, 0.2, 2.0), strict=True)
    params = {name: np.full(3, value, dtype=np.float32) for name, value in values}
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="input_bn")],
        "standalone",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(array, name) for name, array in params.items()],
    )
    path = tmp_path / "standalone.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["check", str(path)]) == 0
    capsys.readouterr()
    assert main(["check", str(path), "--fail-on-any-bn"]) == 1
    out = capsys.readouterr().out
    record = bnfold.check(str(path)).skipped[0]
    assert "input_bn" in out and record.reason.value in out
    assert main(["check", "-q", str(path), "--fail-on-any-bn"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"bnfold: check: {path}: 1 BatchNormalization remain(s): input_bn"


def test_check_json_reports_foldable_not_folded(chain_files, capsys):
    assert main(["check", str(chain_files["original"]), "--json", "-", "-q"]) == 1
    document = json.loads(capsys.readouterr().out)
    statuses = {record["status"] for model in document["models"] for record in model["foldable"]}
    assert statuses == {"foldable"}
    assert document["foldable_total"] == 3


def test_verify_timeout_exits_1_with_one_line(chain_files, capsys):
    code = main(["verify", str(chain_files["original"]), str(chain_files["good"]), "--timeout", "1e-9"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().startswith("bnfold: error: verification timed out after 1e-09 s")


def test_fold_timeout_exits_1_and_writes_nothing(chain_files, capsys):
    output = chain_files["original"].with_name("out.onnx")
    assert main(["-q", str(chain_files["original"]), "-o", str(output), "--timeout", "1e-9"]) == 1
    assert not output.exists()
    assert capsys.readouterr().err.strip().startswith("bnfold: error: verification timed out")


def test_verify_progress_is_a_line_per_iteration_without_a_terminal(chain_files, capsys, monkeypatch):
    monkeypatch.setattr(verify_options_module, "PROGRESS_AFTER_SECONDS", 0.0)
    assert main(["verify", str(chain_files["original"]), str(chain_files["good"]), "--iterations", "2"]) == 0
    err = capsys.readouterr().err
    for line in ("verify: original (cpu) 1/2", "verify: original (cpu) 2/2", "verify: cpu: candidate 2/2"):
        assert line in err


def test_verify_progress_on_a_terminal_is_a_transient_bar(chain_files):
    import io

    from rich.console import Console

    from bnfold.validate import verify

    stream = io.StringIO()
    with verify_options_module.VerifyProgress(Console(file=stream, force_terminal=True, width=100)) as progress:
        verify(chain_files["original"], chain_files["good"], progress=progress)
        assert progress._progress is not None and set(progress._tasks) >= {"original (cpu)", "cpu: candidate"}
    assert progress._progress is None  # stopped: the bar does not stay in the log
    assert "verify: original (cpu)" in stream.getvalue()


@pytest.mark.parametrize(
    ("command", "present", "absent"),
    [
        ("check", ["0  nothing foldable", "3  unreadable"], ["4  ", "5  ", "verification"]),
        ("verify", ["1  verification failed or timed out", "4  a provider"], ["check"]),
        ("lower-training", ["0  success", "2  usage error"], ["1  ", "4  ", "verification"]),
    ],
)
def test_help_lists_only_the_exit_codes_a_command_returns(command, present, absent, capsys):
    assert main([command, "--help"]) == 0
    epilog = capsys.readouterr().out.split("exit codes:")[1]
    assert all(text in epilog for text in present)
    assert not any(text in epilog for text in absent)


def test_keep_failed_help_names_the_real_file(capsys):
    main(["fold", "--help"])
    assert "<stem>.folded.failed.onnx" in " ".join(capsys.readouterr().out.split())


def test_dir_lists_the_lazy_api():
    assert {"fold", "verify", "recalibrate", "check"} <= set(dir(bnfold))


def test_fold_step_summary_has_the_fold_counts(chain_files, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["-q", str(chain_files["original"]), "-o", str(tmp_path / "out.onnx")]) == 0
    text = summary.read_text()
    assert "| BatchNormalization folded | 3 / 3 |" in text
    assert "### bnfold verify: ✅ passed" in text


def _readme_recalibration_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Recalibrate, then fold", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_recalibration_snippet_runs_verbatim(tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "demo_resnet.onnx", tmp_path / "models" / "demo_resnet.onnx")
    commands = _readme_recalibration_commands()
    assert commands[0] == "mkdir -p calib"
    for command in commands:
        words = shlex.split(command)
        if words[0] == "bnfold":
            words = [sys.executable, "-m", "bnfold", *words[1:]]
        elif words[0] == "python":
            words = [sys.executable, *words[1:]]
        result = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{command}: {result.stderr}"
    assert (tmp_path / "demo.folded.onnx").exists()
