"""External data: locations that escape the model's directory, broken data files, and the output's data file.

A location must be relative, free of ``..``, and resolve (symlinks included) inside the model's directory; the
data file must exist and cover ``offset + length`` and the bytes the tensor's shape needs. Output data never
replaces a data file the input reads, with ``-o`` or ``--in-place``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from security_support import set_external_entry, snapshot, with_external_data, write_model

from bnfold.cli import _available_commands
from bnfold.errors import InvalidModelError
from bnfold.files import load_model
from fuzz import seeds

DATA = "model.onnx.data"


def _external_model(directory: Path, location: str = DATA) -> tuple[onnx.ModelProto, bytes]:
    """A 16 → 16 channel Conv + BN, W (9216 bytes), B and the BN parameters in ``location`` (not written)."""
    directory.mkdir(parents=True, exist_ok=True)
    return with_external_data(seeds.conv_bn(channels=(16, 16)), location)


def _write(directory: Path, model: onnx.ModelProto, data: bytes | None, data_name: str = DATA) -> Path:
    if data is not None:
        (directory / data_name).write_bytes(data)
    return write_model(directory / "model.onnx", model)


def absolute_location(directory: Path) -> Path:
    model, data = _external_model(directory)
    (directory / DATA).write_bytes(data)
    set_external_entry(model, "W", "location", str((directory / DATA).resolve()))
    return _write(directory, model, None)


def windows_drive_location(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "location", "C:\\weights\\model.onnx.data")
    return _write(directory, model, data)


def parent_location(directory: Path) -> Path:
    model, data = _external_model(directory)
    (directory.parent / DATA).write_bytes(data)
    set_external_entry(model, "W", "location", f"../{DATA}")
    return _write(directory, model, data)


def dot_dot_inside_location(directory: Path) -> Path:
    model, data = _external_model(directory)
    (directory / "sub").mkdir()
    set_external_entry(model, "W", "location", f"sub/../{DATA}")
    return _write(directory, model, data)


def symlink_file_outside(directory: Path) -> Path:
    model, data = _external_model(directory)
    outside = directory.parent / "outside"
    outside.mkdir()
    (outside / "secret.data").write_bytes(data)
    os.symlink(outside / "secret.data", directory / "link.data")
    for tensor in model.graph.initializer:
        set_external_entry(model, tensor.name, "location", "link.data")
    return _write(directory, model, None)


def symlink_directory_outside(directory: Path) -> Path:
    model, data = _external_model(directory)
    outside = directory.parent / "outside"
    outside.mkdir()
    (outside / DATA).write_bytes(data)
    os.symlink(outside, directory / "dirlink")
    set_external_entry(model, "W", "location", f"dirlink/{DATA}")
    return _write(directory, model, data)


def hard_link_from_outside(directory: Path) -> Path:
    model, data = _external_model(directory)
    outside = directory.parent / "outside"
    outside.mkdir()
    (outside / "secret.data").write_bytes(data)
    os.link(outside / "secret.data", directory / DATA)  # no path shows that it lives elsewhere too
    return _write(directory, model, None)


def missing_data_file(directory: Path) -> Path:
    model, _data = _external_model(directory)
    return _write(directory, model, None)


def data_file_is_a_directory(directory: Path) -> Path:
    model, _data = _external_model(directory)
    (directory / DATA).mkdir()
    return _write(directory, model, None)


def truncated_data_file(directory: Path) -> Path:
    model, data = _external_model(directory)
    return _write(directory, model, data[: len(data) // 2])


def offset_beyond_file(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "offset", str(len(data) + 4096))
    return _write(directory, model, data)


def length_beyond_file(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "length", str(len(data) * 2))
    return _write(directory, model, data)


def length_shorter_than_shape(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "length", "16")
    return _write(directory, model, data)


def negative_offset(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "offset", "-8")
    return _write(directory, model, data)


def nul_in_location(directory: Path) -> Path:
    model, data = _external_model(directory)
    set_external_entry(model, "W", "location", "model\x00.data")
    return _write(directory, model, data)


UNSAFE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "absolute": (absolute_location, "absolute external-data location"),
    "windows_drive": (windows_drive_location, "absolute external-data location"),
    "parent": (parent_location, "contains '..'"),
    "dot_dot_inside": (dot_dot_inside_location, "contains '..'"),
    "symlink_file_outside": (symlink_file_outside, "resolves outside"),
    "symlink_dir_outside": (symlink_directory_outside, "resolves outside"),
    "hard_link": (hard_link_from_outside, "2 hard links; refused"),
    "missing_file": (missing_data_file, "not found"),
    "data_is_directory": (data_file_is_a_directory, "not found"),
    "truncated_file": (truncated_data_file, "truncated"),
    "offset_beyond": (offset_beyond_file, "truncated"),
    "length_beyond": (length_beyond_file, "truncated"),
    "length_short": (length_shorter_than_shape, "needs 9216 bytes"),
    "negative_offset": (negative_offset, "not a non-negative integer"),
    "nul_in_location": (nul_in_location, "NUL"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_load_model_refuses_unsafe_external_data(tmp_path: Path, kind: str) -> None:
    builder, reason = UNSAFE[kind]
    path = builder(tmp_path / "model_dir")
    with pytest.raises(InvalidModelError) as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert reason in str(caught.value)


@pytest.mark.parametrize("command", ["fold", "check", "verify"])
@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_cli_refuses_unsafe_external_data(run_cli, tmp_path: Path, kind: str, command: str) -> None:
    if command not in _available_commands():
        pytest.skip(f"no {command} subcommand")
    path = UNSAFE[kind][0](tmp_path / "model_dir")
    output = tmp_path / "model_dir" / "out.onnx"
    before = snapshot(tmp_path)
    argv = {
        "fold": ["fold", path, "-o", output],
        "check": ["check", path],
        "verify": ["verify", path, path],
    }[command]
    result = run_cli(*argv)
    assert result.code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and str(path) in result.stderr_lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_symlink_inside_the_model_directory_is_followed(run_cli, tmp_path: Path) -> None:
    directory = tmp_path / "model_dir"
    model, data = _external_model(directory)
    (directory / "real.data").write_bytes(data)
    os.symlink("real.data", directory / "link.data")
    for tensor in model.graph.initializer:
        set_external_entry(model, tensor.name, "location", "link.data")
    path = _write(directory, model, None)
    result = run_cli("fold", path, "-o", tmp_path / "out.onnx")
    assert result.code == 0, result.stderr
    assert [node.op_type for node in onnx.load(tmp_path / "out.onnx").graph.node] == ["Conv"]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)  # resolves external data beside the file
    return {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def _data_files(path: Path) -> set[str]:
    model = onnx.load(path, load_external_data=False)
    return {
        entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }


def test_output_data_file_never_takes_the_inputs_data_name(run_cli, tmp_path: Path) -> None:
    # The input reads "out.onnx.data": exactly the name the output would get by default.
    model, data = _external_model(tmp_path, "out.onnx.data")
    source = _write(tmp_path, model, data, "out.onnx.data")
    with open(tmp_path / "out.onnx.data", "rb") as original_inode:  # sees writes even after a rename over it
        result = run_cli("fold", source, "-o", tmp_path / "out.onnx")
        assert result.code == 0, result.stderr
        assert original_inode.read() == data
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    assert "out.onnx.data" not in _data_files(tmp_path / "out.onnx")
    assert [node.op_type for node in onnx.load(tmp_path / "out.onnx").graph.node] == ["Conv"]
    assert len(load_model(source).graph) == 2  # the input still loads, with its own data


def test_load_model_records_the_files_it_reads(tmp_path: Path) -> None:
    from bnfold.files import SOURCE_FILES_META

    model, data = _external_model(tmp_path)
    source = _write(tmp_path, model, data)
    loaded = load_model(source)
    assert loaded.meta[SOURCE_FILES_META] == frozenset({source.resolve(), (tmp_path / DATA).resolve()})


@pytest.mark.parametrize("in_place", [False, True], ids=["beside", "in_place"])
def test_saved_external_data_never_replaces_a_file_the_model_reads(tmp_path: Path, in_place: bool) -> None:
    from bnfold import api, files

    data_name = "model.onnx.data" if in_place else "out.onnx.data"
    model, data = _external_model(tmp_path, data_name)
    source = _write(tmp_path, model, data, data_name)
    destination = source if in_place else tmp_path / "out.onnx"
    folded, report = api.fold(load_model(source))
    assert len(report.folded) == 1
    with open(tmp_path / data_name, "rb") as original_inode:
        files.save_model(folded, destination, external_data=True)
        assert original_inode.read() == data
    written = _data_files(destination)
    assert written and data_name not in written
    reloaded = _initializers(destination)
    assert set(reloaded) == {"W", "B"}
    assert [node.op_type for node in onnx.load(destination).graph.node] == ["Conv"]


def test_in_place_with_external_data_never_rewrites_the_data_file(run_cli, tmp_path: Path) -> None:
    model, data = _external_model(tmp_path)
    source = _write(tmp_path, model, data)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    _write(pristine, model, data)

    with open(tmp_path / DATA, "rb") as original_inode:
        first = run_cli("fold", source, "--in-place")
        assert first.code == 0, first.stderr
        assert original_inode.read() == data  # the old data file was replaced or removed, never written into
    assert DATA not in _data_files(source)
    assert [node.op_type for node in onnx.load(source).graph.node] == ["Conv"]

    second = run_cli("fold", source, "--in-place")  # nothing left to fold; still atomic and still safe
    assert second.code == 0, second.stderr
    assert [node.op_type for node in onnx.load(source).graph.node] == ["Conv"]

    if "verify" in _available_commands():
        verify = run_cli("verify", pristine / "model.onnx", source)
        assert verify.code == 0, verify.stdout + verify.stderr
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
