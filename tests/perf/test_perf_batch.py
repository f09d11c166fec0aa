"""Batch mode: ``bnfold fold A.onnx B.onnx DIR/ -j N``: one line per model, a total, the right exit code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from perf_model_factory import conv_bn_chain
from rich.console import Console

from bnfold import batch
from bnfold.cli import main, render
from bnfold.errors import ExitCode
from bnfold.files import load_model
from bnfold.workflow import FoldOutcome


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    return [
        conv_bn_chain(tmp_path / "in" / "a.onnx", layers=2, channels=8),
        conv_bn_chain(tmp_path / "in" / "b.onnx", layers=3, channels=8, seed=1),
        conv_bn_chain(tmp_path / "ext" / "c.onnx", layers=4, channels=16, external=True, seed=2),
    ]


def test_batch_folds_every_model_into_the_directory(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["fold", *map(str, models), f"{out}/", "-j", "2", "--no-verify"])
    assert code == ExitCode.OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert sorted(line.split(" ")[1] for line in lines[:3]) == sorted(map(str, models))
    assert any(f"{models[1]} → {out / 'b.onnx'}: 3/3 BN folded" in line for line in lines)
    assert lines[3].startswith("total: 3/3 models succeeded (3 with a BN folded), 0 failed, 9/9 BN folded, ")
    assert sorted(os.listdir(out)) == ["a.onnx", "b.onnx", "c.onnx", "c.onnx.data"]
    assert [len(load_model(out / name).graph) for name in ("a.onnx", "b.onnx", "c.onnx")] == [2, 3, 4]


def test_batch_verifies_each_model(models, tmp_path: Path, capsys) -> None:
    code = main(["fold", str(models[0]), str(models[2]), str(tmp_path / "out") + "/", "-j", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == ExitCode.OK
    assert sum("verify passed" in line for line in lines) == 2


def test_batch_reports_a_broken_model_and_folds_the_rest(models, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "in" / "broken.onnx"
    broken.write_bytes(b"not a model")
    out = tmp_path / "out"
    code = main(["fold", str(models[0]), str(broken), str(out) + "/", "-j", "2", "--no-verify"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == ExitCode.INVALID_MODEL
    assert any(line.startswith(f"✗ {broken}: error: ") for line in lines)
    assert lines[-1].startswith("total: 1/2 models succeeded (1 with a BN folded), 1 failed, 2/2 BN folded, ")
    assert sorted(os.listdir(out)) == ["a.onnx"]


def test_batch_quiet_prints_only_failures_to_stderr(models, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "in" / "broken.onnx"
    broken.write_bytes(b"")
    code = main(["fold", str(models[0]), str(broken), str(tmp_path / "out") + "/", "-q", "--no-verify", "-j", "1"])
    captured = capsys.readouterr()
    assert code == ExitCode.INVALID_MODEL
    assert captured.out == ""
    assert captured.err.startswith(f"✗ {broken}: error: ")


def test_batch_in_place_replaces_each_input(models, capsys) -> None:
    code = main(["fold", str(models[0]), str(models[2]), "--in-place", "--no-verify", "-j", "2"])
    assert code == ExitCode.OK
    assert [len(load_model(path).graph) for path in (models[0], models[2])] == [2, 4]
    # the old data file is kept (a copy of c.onnx may read it; issue 14, defect 3)
    assert sorted(os.listdir(models[2].parent)) == ["c.onnx", "c.onnx.1.data", "c.onnx.data"]


def test_batch_json_lists_every_model_and_the_total(models, tmp_path: Path, capsys) -> None:
    code = main(["fold", *map(str, models[:2]), str(tmp_path / "out") + "/", "--no-verify", "--json", "-"])
    document = json.loads(capsys.readouterr().out)
    assert code == ExitCode.OK
    assert sorted(entry["input"] for entry in document["models"]) == sorted(map(str, models[:2]))
    assert document["total"]["models"] == 2
    assert document["total"]["batch_norm_folded"] == 5
    assert all(entry["exit_code"] == 0 and entry["verify"] is None for entry in document["models"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "x.onnx"], "--output names one file"),
        (["--save-inputs", "x.npz"], "--save-inputs applies to one model"),
        (["--in-place"], "--in-place and an output directory are mutually exclusive"),
        (["--only", "nope"], "unknown rule"),
    ],
)
def test_batch_usage_errors(models, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    code = main(["fold", str(models[0]), str(models[1]), str(tmp_path / "out") + "/", "--no-verify", *extra])
    assert code == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_several_models_without_a_directory_is_a_usage_error(models, capsys) -> None:
    code = main(["fold", str(models[0]), str(models[1]), "--no-verify"])
    assert code == ExitCode.USAGE
    assert "the last argument must be an output directory" in capsys.readouterr().err


def test_clashing_output_names_are_a_usage_error(tmp_path: Path, capsys) -> None:
    first = conv_bn_chain(tmp_path / "x" / "m.onnx", layers=1, channels=4)
    second = conv_bn_chain(tmp_path / "y" / "m.onnx", layers=1, channels=4)
    code = main(["fold", str(first), str(second), str(tmp_path / "out") + "/", "--no-verify"])
    assert code == ExitCode.USAGE
    assert "would both be written to" in capsys.readouterr().err


def test_output_directory_holding_an_input_is_refused(models, capsys) -> None:
    code = main(["fold", str(models[0]), str(models[1]), str(models[0].parent), "--no-verify"])
    assert code == ExitCode.USAGE
    assert "the output would overwrite the input" in capsys.readouterr().err


def test_batch_exit_code_is_the_largest() -> None:
    results = [FoldOutcome("a", "b", code, 0.0) for code in (0, 3, 1)]
    assert batch.batch_exit_code(results) == 3
    assert batch.batch_exit_code([]) == 0


def test_progress_bar_shows_on_a_terminal_after_the_threshold(monkeypatch) -> None:
    monkeypatch.setattr(render, "PROGRESS_AFTER_SECONDS", 0.0)
    console = Console(force_terminal=True, record=True, width=80)
    results = [FoldOutcome("a", "b", 0, 0.0) for _ in range(3)]
    assert list(render.with_progress(console, iter(results), 3, quiet=False)) == results
    assert "folding" in console.export_text()


def test_no_progress_bar_when_not_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(render, "PROGRESS_AFTER_SECONDS", 0.0)
    console = Console(force_terminal=False, record=True, width=80)
    results = [FoldOutcome("a", "b", 0, 0.0) for _ in range(3)]
    assert list(render.with_progress(console, iter(results), 3, quiet=False)) == results
    assert console.export_text() == ""
