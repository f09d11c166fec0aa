"""Single-model and batch mode are one workflow: the same exit code and the same files for every verify outcome.

``bnfold a.onnx -o single/a.onnx`` and ``bnfold a.onnx batch/ -j 1`` (a batch of one) run the same
:func:`bnfold.workflow.fold_file`. The table covers the verify outcomes: passed, failed (a fold that changes
the result), a provider that is not available (SKIPPED: not a failure, the model is written), and the same
provider with ``--require-provider`` (exit 4, nothing written).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_builders import ConvBN, op_types

from bnfold.cli import main
from bnfold.errors import ExitCode
from bnfold.files import serialize


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    flags: tuple[str, ...]
    exit_code: int
    written: bool
    verdict: str | None  # the JSON report's verify verdict (None: no report, the run ended with an error)


CASES = [
    Case("passed", (), ExitCode.OK, True, "passed"),
    Case("failed", ("--providers", "cpu"), ExitCode.FAILED, False, "failed"),
    Case("provider_skipped", ("--providers", "cuda"), ExitCode.OK, True, "skipped"),
    Case("provider_required_and_missing", ("--providers", "cuda", "--require-provider"), 4, False, None),
]


@pytest.fixture
def cpu_only_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime as a CPU-only installation reports it, whatever this machine has."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture
def fold_changes_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every written Conv weight is scaled by 1.1, as a fold bug would do (the staged model then fails)."""
    real_write = serialize.write_model

    def write_wrong_weights(model: ir.Model, path, data=None) -> None:
        for value in model.graph.initializers.values():
            if value.name == "W":
                value.const_value = ir.Tensor(value.const_value.numpy() * np.float32(1.1), name="W")
        real_write(model, path, data)

    monkeypatch.setattr(serialize, "write_model", write_wrong_weights)


def _run(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None]:
    code = main([*arguments, "--json", "-"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())} if directory.is_dir() else {}


@pytest.mark.usefixtures("cpu_only_onnxruntime")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_single_and_batch_mode_agree(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if case.name == "failed":
        request.getfixturevalue("fold_changes_the_result")
    source = tmp_path / "a.onnx"
    onnx.save(ConvBN().build(), source)
    single, batch = tmp_path / "single", tmp_path / "batch"
    single.mkdir()

    single_code, single_report = _run([str(source), "-o", str(single / "a.onnx"), *case.flags], capsys)
    batch_code, batch_report = _run([str(source), f"{batch}/", "-j", "1", *case.flags], capsys)

    assert single_code == batch_code == case.exit_code
    assert _files(single) == _files(batch)
    assert sorted(_files(single)) == (["a.onnx"] if case.written else [])
    if case.written:
        assert op_types(onnx.load(single / "a.onnx")) == ["Conv"]
        onnx.checker.check_model(onnx.load(single / "a.onnx"), full_check=True)
    (batch_model,) = batch_report["models"]
    assert batch_model["exit_code"] == case.exit_code
    if case.verdict is None:  # ended with an error: the single run printed it and wrote no report
        assert single_report is None
        assert batch_model["fold"] is None and "not available" in batch_model["error"]
        return
    assert single_report["verify"]["verdict"] == batch_model["verify"]["verdict"] == case.verdict
    assert single_report["output"] == (str(single / "a.onnx") if case.written else None)
    assert batch_model["output"] == (str(batch / "a.onnx") if case.written else None)


@pytest.mark.usefixtures("fold_changes_the_result")
def test_keep_failed_keeps_the_candidate_in_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "a.onnx"
    onnx.save(ConvBN().build(), source)
    single, batch = tmp_path / "single", tmp_path / "batch"
    single.mkdir()
    single_code, _ = _run([str(source), "-o", str(single / "a.onnx"), "--keep-failed"], capsys)
    batch_code, report = _run([str(source), f"{batch}/", "-j", "1", "--keep-failed"], capsys)
    assert single_code == batch_code == ExitCode.FAILED
    assert sorted(_files(single)) == sorted(_files(batch)) == ["a.failed.onnx"]
    assert report["models"][0]["kept_failed"] == str(batch / "a.failed.onnx")
