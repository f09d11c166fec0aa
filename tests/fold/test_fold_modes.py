"""Single-model and batch mode are one workflow: the same exit code and the same files for every verify outcome.

``bnfold a.onnx -o single/a.onnx`` and ``bnfold a.onnx batch/ -j 1`` (a batch of one) run the same
:func:`bnfold.workflow.fold_file`. The table covers the verify outcomes: passed, failed (a fold that changes
the result), a provider that is not available (SKIPPED: not a failure, the model is written), and the same
provider with ``--require-provider`` (exit 4, nothing written).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_builders import ConvBN, op_types

from bnfold.cli import main
from bnfold.errors import ExitCode, UsageError
from bnfold.files import serialize
from bnfold.validate.options import VerifyOptions
from bnfold.workflow import FoldOptions, fold_file


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


def test_fold_file_is_the_library_workflow(tmp_path: Path) -> None:
    source, output = tmp_path / "a.onnx", tmp_path / "out.onnx"
    onnx.save(ConvBN().build(), source)
    outcome = fold_file(source, output, FoldOptions(), VerifyOptions(providers=("cpu",)))
    assert outcome.exit_code == ExitCode.OK and outcome.written == str(output)
    assert len(outcome.report.folded) == 1 and outcome.verify_verdict == "passed"
    assert outcome.size_before == source.stat().st_size and outcome.size_after == output.stat().st_size
    assert op_types(onnx.load(output)) == ["Conv"]
    detached = pickle.loads(pickle.dumps(outcome.detached()))  # what a batch worker sends back
    assert detached.verification is None and detached.to_dict() == outcome.to_dict()


def test_fold_options_refuse_an_unknown_rule_before_any_model_is_read() -> None:
    with pytest.raises(UsageError, match="unknown rule"):
        FoldOptions(only=("conv", "no_such_rule"))
    with pytest.raises(UsageError, match="not a single string"):
        FoldOptions(skip="conv")


def test_fold_file_never_keeps_a_failed_model_over_its_input(tmp_path: Path) -> None:
    source = tmp_path / "x.failed.onnx"
    onnx.save(ConvBN().build(), source)
    before = source.read_bytes()
    with pytest.raises(UsageError, match="--keep-failed"):
        fold_file(source, tmp_path / "x.onnx", keep_failed=source)
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.failed.onnx"]
