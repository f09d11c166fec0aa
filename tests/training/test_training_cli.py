"""``bnfold lower-training MODEL -o OUT``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from training_builders import bn_inputs, bn_model, relative_error, run

from bnfold.cli import main
from bnfold.errors import ExitCode
from bnfold.training import evaluate_batch_norm_node


def _write(tmp_path: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_lowers_a_model_and_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = bn_model(15, outputs=3, attributes={"training_mode": 1})
    source, output = _write(tmp_path, model), tmp_path / "lowered.onnx"
    assert main(["lower-training", str(source), "-o", str(output)]) == ExitCode.OK
    assert capsys.readouterr().out == f"lowered 1 training-mode BatchNormalization node: {output}\n"
    lowered = onnx.load(str(output))
    assert [node.op_type for node in lowered.graph.node] == ["Constant", "Constant", "BatchNormalizationTraining"]
    feeds = bn_inputs(np.random.default_rng(0), (2, 3, 4, 5))
    expected = evaluate_batch_norm_node(model.graph.node[0], list(feeds.values()), opset=15)
    for actual, wanted in zip(run(lowered, feeds), expected, strict=True):
        assert relative_error(actual, wanted) <= 1.2e-7
    assert onnx.load(str(source)) == model  # the input is untouched


def test_model_without_training_batch_norm_is_written_unchanged(tmp_path, capsys) -> None:
    source, output = _write(tmp_path, bn_model(15, outputs=1)), tmp_path / "out.onnx"
    assert main(["lower-training", str(source), "-o", str(output), "--debug"]) == ExitCode.OK
    assert capsys.readouterr().out.startswith("no training-mode BatchNormalization found; wrote the model unchanged")
    assert [node.op_type for node in onnx.load(str(output)).graph.node] == ["BatchNormalization"]


def test_quiet_prints_nothing(tmp_path, capsys) -> None:
    source = _write(tmp_path, bn_model(9, outputs=5))
    assert main(["lower-training", str(source), "-o", str(tmp_path / "out.onnx"), "-q"]) == ExitCode.OK
    assert capsys.readouterr().out == ""


def test_refuses_to_overwrite_the_input(tmp_path, capsys) -> None:
    source = _write(tmp_path, bn_model(15, outputs=3, attributes={"training_mode": 1}))
    before = source.read_bytes()
    same_file = tmp_path / "." / "model.onnx"
    assert main(["lower-training", str(source), "-o", str(same_file)]) == ExitCode.USAGE
    assert "the output would overwrite the input" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_refuses_a_directory_as_output(tmp_path, capsys) -> None:
    source = _write(tmp_path, bn_model(15, outputs=3, attributes={"training_mode": 1}))
    assert main(["lower-training", str(source), "-o", str(tmp_path)]) == ExitCode.USAGE
    assert "is a directory; give a file path" in capsys.readouterr().err


def test_output_is_required(tmp_path, capsys) -> None:
    source = _write(tmp_path, bn_model(15, outputs=1))
    assert main(["lower-training", str(source)]) == ExitCode.USAGE
    assert "-o/--output" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        (None, ExitCode.INVALID_MODEL, "no such file"),
        (bn_model(9, outputs=3), ExitCode.INVALID_MODEL, "BatchNormalization-9 node 'bn': 3 outputs"),
        (bn_model(6, outputs=1), ExitCode.USAGE, "at opset 6 cannot be lowered"),
    ],
    ids=["missing", "invalid-node", "opset-6"],
)
def test_errors_are_one_line_with_their_exit_code(tmp_path, capsys, model, code, message) -> None:
    source = tmp_path / "missing.onnx" if model is None else _write(tmp_path, model)
    output = tmp_path / "out.onnx"
    assert main(["lower-training", str(source), "-o", str(output)]) == code
    error = capsys.readouterr().err
    assert error.startswith("bnfold: error: ") and message in error and error.count("\n") == 1
    assert not output.exists()
