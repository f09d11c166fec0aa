"""Determinism: the same input gives byte-identical output, across runs and ``PYTHONHASHSEED`` values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest
from security_support import run_subprocess, with_external_data, write_model

from bnfold import api, files
from fuzz import seeds


def _digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("seed_name", sorted(seeds.SEED_BUILDERS))
def test_fold_and_save_twice_gives_identical_bytes(tmp_path: Path, seed_name: str) -> None:
    source = write_model(tmp_path / "model.onnx", seeds.SEED_BUILDERS[seed_name]())
    outputs = []
    for run in range(2):
        folded, _report = api.fold(files.load_model(source))
        output = tmp_path / f"out{run}.onnx"
        files.save_model(folded, output)
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]


def test_external_data_output_is_identical_across_runs(tmp_path: Path) -> None:
    model, data = with_external_data(seeds.conv_bn(channels=(16, 32)), "model.onnx.data")
    (tmp_path / "model.onnx.data").write_bytes(data)
    source = write_model(tmp_path / "model.onnx", model)
    digests = []
    for run in range(2):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        folded, _report = api.fold(files.load_model(source))
        files.save_model(folded, directory / "out.onnx", external_data=True)
        names = sorted(path.name for path in directory.iterdir())
        assert names == ["out.onnx", "out.onnx.data"]
        digests.append(_digest(*(directory / name for name in names)))
    assert digests[0] == digests[1]


def test_cli_output_is_identical_across_hash_seeds(tmp_path: Path) -> None:
    source = write_model(tmp_path / "model.onnx", seeds.chain())
    digests = {}
    for hash_seed in ("0", "1", "4242"):
        output = tmp_path / f"out_{hash_seed}.onnx"
        result = run_subprocess("fold", source, "-o", output, "--no-verify", env={"PYTHONHASHSEED": hash_seed})
        assert result.code == 0, result.stderr
        digests[hash_seed] = _digest(output)
    assert len(set(digests.values())) == 1, digests
    folded = onnx.load(tmp_path / "out_0.onnx")
    assert [node.op_type for node in folded.graph.node].count("BatchNormalization") == 2
