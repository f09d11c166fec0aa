"""``bnfold recalibrate``: exit codes, messages, --fold, --in-place, --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import bnfold
from bnfold.cli import main
from bnfold.files import load_model
from tests.recalibrate.recalibrate_helpers import draw

DEMO = Path("models/demo_resnet.onnx")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    for index in range(3):
        np.savez(directory / f"batch{index}.npz", input=draw((4, 3, 32, 32), index))
    return directory


def _statistics(path: Path) -> list[np.ndarray]:
    model = load_model(path)
    return [node.inputs[4].const_value.numpy() for node in model.graph if node.op_type == "BatchNormalization"]


def test_writes_recalibrated_model_with_the_api_result(tmp_path: Path, data_dir: Path, capsys) -> None:
    output = tmp_path / "out.onnx"
    assert main(["recalibrate", str(DEMO), "--data", str(data_dir), "-o", str(output)]) == 0
    assert (
        "recalibrated 9 BatchNormalization (pooled, onnx variance; 3 batch(es), 7 pass(es))" in capsys.readouterr().out
    )
    expected, _ = bnfold.recalibrate(DEMO, data_dir)
    api_vars = [node.inputs[4].const_value.numpy() for node in expected.graph if node.op_type == "BatchNormalization"]
    for written, computed in zip(_statistics(output), api_vars, strict=True):
        np.testing.assert_array_equal(written, computed)


def test_single_npz_file_and_match_torch_json(tmp_path: Path, data_dir: Path, capsys) -> None:
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["recalibrate", str(DEMO), "--data", str(data_dir / "batch0.npz"), "-o", str(output), "--match-torch"]
    assert main([*args, "--json", str(report)]) == 0
    document = json.loads(report.read_text())
    assert (document["mode"], document["convention"], document["passes"], document["batches"]) == (
        "match_torch",
        "torch",
        1,
        1,
    )
    assert [record["status"] for record in document["records"]] == ["recalibrated"] * 9


def test_fold_writes_a_folded_model_that_verifies(tmp_path: Path, data_dir: Path, capsys) -> None:
    output = tmp_path / "folded.onnx"
    assert main(["recalibrate", str(DEMO), "--data", str(data_dir), "-o", str(output), "--fold"]) == 0
    out = capsys.readouterr().out
    assert "folded 9 / 9 BatchNormalization" in out and "verify (folded against recalibrated, cpu): passed" in out
    assert _statistics(output) == []  # no BN left
    recalibrated, _ = bnfold.recalibrate(DEMO, data_dir)
    assert bnfold.verify(recalibrated, output, providers=("cpu",)).passed


def test_output_equal_to_input_is_a_usage_error_unless_in_place(tmp_path: Path, data_dir: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(DEMO, model)
    before = model.read_bytes()
    assert main(["recalibrate", str(model), "--data", str(data_dir), "-o", str(model)]) == 2
    assert "the output would overwrite the input; pass --in-place" in capsys.readouterr().err
    assert model.read_bytes() == before
    assert main(["recalibrate", str(model), "--data", str(data_dir), "--in-place"]) == 0
    assert model.read_bytes() != before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give -o/--output OUT (or --in-place"),
        (["-o", "{tmp}/o.onnx", "--match-torch", "--convention", "onnx"], "cannot be combined with --convention onnx"),
    ],
)
def test_contradictory_options_are_usage_errors(tmp_path: Path, data_dir: Path, capsys, extra, message) -> None:
    extra = [part.format(tmp=tmp_path) for part in extra]
    assert main(["recalibrate", str(DEMO), "--data", str(data_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_data_is_a_one_line_usage_error(tmp_path: Path, capsys) -> None:
    output = tmp_path / "o.onnx"
    wrong_key = tmp_path / "wrong.npz"
    np.savez(wrong_key, image=draw((2, 3, 32, 32), 0))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        wrong_key: f"--data {wrong_key}: missing input(s) input; unknown key(s) image (model inputs: input)",
        not_npz: f"--data {not_npz}: not a readable .npz file",
        empty: f"--data {empty}: the directory holds no .npz file",
        tmp_path / "missing": "no such file or directory",
    }
    for data, message in cases.items():
        assert main(["recalibrate", str(DEMO), "--data", str(data), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not output.exists()


def test_invalid_model_exits_3(tmp_path: Path, data_dir: Path, capsys) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert main(["recalibrate", str(broken), "--data", str(data_dir), "-o", str(tmp_path / "o.onnx")]) == 3
    assert "not a valid ONNX model" in capsys.readouterr().err
