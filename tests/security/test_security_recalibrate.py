"""``bnfold recalibrate`` with hostile or broken model, data and output paths.

Every case: the documented exit code (2 usage/bad data, 3 invalid model, 1 non-finite statistics), exactly one
line on stderr starting with ``bnfold: error:`` (no traceback, no "internal error"), the input model's bytes
unchanged, and nothing left in the working directory (no output file, no hidden staging directory) — checked
with a snapshot of the whole directory, hidden entries included. Pickles inside calibration data are refused
and never unpickled: a pickled object whose unpickling would create a directory proves it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from security_support import (
    CliResult,
    conv_bn_model,
    run_subprocess,
    snapshot,
    with_external_data,
    write_model,
)
from test_security_bad_input import HOSTILE
from test_security_external_data import UNSAFE

from bnfold.errors import ExitCode, UsageError
from bnfold.recalibration.data import NpzBatches, read_batch
from fuzz import seeds

# conv_bn_model(): X[1, 4, 5, 5] float32 → Conv → BN → Y.
GOOD_X = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_clean_failure(
    result: CliResult, code: int, reason: str, workdir: Path, before: dict[str, str], model: Path | None = None
) -> None:
    """Exit ``code``, one ``bnfold: error:`` line holding ``reason``, ``workdir`` exactly as before."""
    assert result.code == code, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("bnfold: error: "), line
    assert "Traceback" not in result.stderr and "internal error" not in line
    assert reason in line, line
    assert snapshot(workdir) == before  # input unchanged; no output, staging directory or data file left
    if model is not None and model.is_file():
        assert before[str(model.relative_to(workdir))] == _digest(model)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with the tiny model ``model.onnx`` and a good batch ``good.npz``."""
    write_model(tmp_path / "model.onnx", conv_bn_model())
    np.savez(tmp_path / "good.npz", X=GOOD_X)
    return tmp_path


def _recalibrate(run_cli, model: Path, data: Path, output: Path | None, *extra: object) -> CliResult:
    argv: list[object] = ["recalibrate", model, "--data", data]
    if output is not None:
        argv += ["-o", output]
    return run_cli(*argv, *extra)


def test_good_inputs_succeed_so_the_failures_below_are_meaningful(run_cli, workdir: Path) -> None:
    result = _recalibrate(run_cli, workdir / "model.onnx", workdir / "good.npz", workdir / "out.onnx")
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    assert sorted(path.name for path in workdir.iterdir()) == ["good.npz", "model.onnx", "out.onnx"]
    model = onnx.load(workdir / "out.onnx")
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    assert var.dims == [6]


# --- the model side ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_model_exits_3_with_one_line(run_cli, workdir: Path, kind: str) -> None:
    builder, reason = HOSTILE[kind]
    model = builder(workdir)
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, workdir / "good.npz", workdir / "out.onnx")
    _assert_clean_failure(result, ExitCode.INVALID_MODEL, reason, workdir, before, model)
    assert str(model) in result.stderr_lines[0]


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_external_data_exits_3_with_one_line(run_cli, tmp_path: Path, kind: str) -> None:
    builder, reason = UNSAFE[kind]
    model = builder(tmp_path / "model_dir")  # X[1, 16, 5, 5]
    np.savez(tmp_path / "data16.npz", X=np.ones((1, 16, 5, 5), np.float32))
    before = snapshot(tmp_path)
    result = _recalibrate(run_cli, model, tmp_path / "data16.npz", tmp_path / "model_dir" / "out.onnx")
    _assert_clean_failure(result, ExitCode.INVALID_MODEL, reason, tmp_path, before, model)
    assert str(model) in result.stderr_lines[0]


def test_debug_shows_the_traceback_of_a_hostile_model(run_cli, workdir: Path) -> None:
    model = HOSTILE["random_bytes"][0](workdir)
    result = _recalibrate(run_cli, model, workdir / "good.npz", workdir / "out.onnx", "--debug")
    assert result.code == ExitCode.INVALID_MODEL
    assert "Traceback (most recent call last)" in result.stderr and "InvalidModelError" in result.stderr
    assert result.stderr_lines[-1].startswith("bnfold: error: ")


# --- the data side -----------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates the directory ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _marker(directory: Path) -> Path:
    return directory.parent / f"{directory.name}-unpickled"


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        np.savez(directory / name, **arrays)
        return directory / name

    return build


def _raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        (directory / name).write_bytes(data)
        return directory / name

    return build


def _zip(name: str, members: dict[str, bytes], *, encrypted: bool = False) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        with zipfile.ZipFile(directory / name, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        if encrypted:  # set the "encrypted" flag bit in the local and central headers: zipfile wants a password
            raw = bytearray((directory / name).read_bytes())
            for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
                raw[raw.index(signature) + flag_offset] |= 0x1
            (directory / name).write_bytes(bytes(raw))
        return directory / name

    return build


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _huge_header() -> bytes:
    """A .npy header declaring 2**48 float32 values (1 PiB) followed by 64 bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (2**24, 2**24)})
    return buffer.getvalue() + bytes(64)


def missing_data(directory: Path) -> Path:
    return directory / "absent.npz"


def empty_data_directory(directory: Path) -> Path:
    (directory / "batches").mkdir()
    (directory / "batches" / "not_a_batch.txt").write_text("x")
    return directory / "batches"


def truncated_npz(directory: Path) -> Path:
    np.savez(directory / "truncated.npz", X=GOOD_X)
    data = (directory / "truncated.npz").read_bytes()
    (directory / "truncated.npz").write_bytes(data[: len(data) // 2])
    return directory / "truncated.npz"


def pickled_object_array_npz(directory: Path) -> Path:
    member = _npy_bytes(np.array([_Trap(_marker(directory))], dtype=object))
    return _zip("object.npz", {"X.npy": member})(directory)


def pickled_object_array_npy(directory: Path) -> Path:
    (directory / "object.npy").write_bytes(_npy_bytes(np.array([_Trap(_marker(directory))], dtype=object)))
    return directory / "object.npy"


def plain_pickle(directory: Path) -> Path:
    (directory / "pickle.npz").write_bytes(pickle.dumps({"X": _Trap(_marker(directory))}))
    return directory / "pickle.npz"


def second_batch_broken(directory: Path) -> Path:
    """A directory whose first batch is good and whose second is not: fails mid-pass, writes nothing."""
    (directory / "batches").mkdir()
    np.savez(directory / "batches" / "a.npz", X=GOOD_X)
    np.savez(directory / "batches" / "b.npz", X=GOOD_X.astype(np.float64))
    return directory / "batches"


DATA_CASES: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    # what recalibrate accepts: an .npz file, or a directory of them
    "missing_file": (missing_data, 2, "absent.npz: no such file or directory"),
    "directory_without_npz": (empty_data_directory, 2, "the directory holds no .npz file"),
    "empty_file": (_raw("empty.npz", b""), 2, "not a readable .npz file (the file is empty)"),
    "random_bytes": (_raw("random.npz", random.Random(3).randbytes(4096)), 2, "no zip archive header"),
    "plain_npy": (_raw("plain.npy", _npy_bytes(GOOD_X)), 2, "plain.npy: not a readable .npz file (no zip"),
    "truncated_npz": (truncated_npz, 2, "not a readable .npz file (File is not a zip file)"),
    "corrupt_member": (_zip("corrupt.npz", {"X.npy": b"\x93NUMPY garbage"}), 2, "not a readable .npz file"),
    "huge_declared_shape": (_zip("huge.npz", {"X.npy": _huge_header()}), 2, "has rank 2, the model takes rank 4"),
    "encrypted_member": (_zip("locked.npz", {"X.npy": _npy_bytes(GOOD_X)}, encrypted=True), 2, "password"),
    "no_arrays": (_npz("nothing.npz"), 2, "nothing.npz: the file holds no arrays"),
    "not_an_array_member": (_zip("bytes.npz", {"X": b"abc"}), 2, "member 'X' is not an .npy array"),
    # pickles: refused, never unpickled
    "pickled_object_array_npz": (pickled_object_array_npz, 2, "holds Python objects; pickles are refused"),
    "pickled_object_array_npy": (pickled_object_array_npy, 2, "object.npy: not a readable .npz file"),
    "plain_pickle": (plain_pickle, 2, "pickle.npz: not a readable .npz file (no zip archive header)"),
    # arrays that do not fit the model
    "wrong_input_name": (_npz("named.npz", Z=GOOD_X), 2, "missing input(s) X; unknown key(s) Z (model inputs: X)"),
    "extra_key": (_npz("extra.npz", X=GOOD_X, Y=GOOD_X), 2, "unknown key(s) Y (model inputs: X)"),
    "wrong_rank": (_npz("rank.npz", X=GOOD_X[0]), 2, "input 'X' has rank 3, the model takes rank 4"),
    "wrong_shape": (_npz("shape.npz", X=np.ones((1, 3, 5, 5), np.float32)), 2, "axis 1 is 3, the model fixes it to 4"),
    "float64": (_npz("f64.npz", X=GOOD_X.astype(np.float64)), 2, "input 'X' is float64, the model takes float32"),
    "int32": (_npz("i32.npz", X=GOOD_X.astype(np.int32)), 2, "input 'X' is int32, the model takes float32"),
    "zero_samples": (_npz("zero.npz", X=np.ones((0, 4, 5, 5), np.float32)), 2, "axis 0 is 0, the model fixes it to 1"),
    "second_batch_broken": (second_batch_broken, 2, "b.npz: input 'X' is float64, the model takes float32"),
    # values: statistics that are not finite are never written (exit 1, documented)
    "nan": (_npz("nan.npz", X=np.full_like(GOOD_X, np.nan)), 1, "the measured statistics are not finite"),
    "inf": (_npz("inf.npz", X=np.full_like(GOOD_X, np.inf)), 1, "the measured statistics are not finite"),
}


@pytest.mark.parametrize("kind", sorted(DATA_CASES))
def test_bad_data_gets_one_line_and_its_exit_code(run_cli, workdir: Path, kind: str) -> None:
    builder, code, reason = DATA_CASES[kind]
    data = builder(workdir)
    model = workdir / "model.onnx"
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, data, workdir / "out.onnx")
    _assert_clean_failure(result, code, reason, workdir, before, model)
    assert not _marker(workdir).exists(), "a pickle was loaded"


@pytest.mark.parametrize("kind", ["wrong_input_name", "nan", "pickled_object_array_npz", "plain_npy"])
def test_bad_data_with_match_torch(run_cli, workdir: Path, kind: str) -> None:
    builder, code, reason = DATA_CASES[kind]
    data = builder(workdir)
    before = snapshot(workdir)
    result = _recalibrate(run_cli, workdir / "model.onnx", data, workdir / "out.onnx", "--match-torch")
    _assert_clean_failure(result, code, reason, workdir, before, workdir / "model.onnx")
    assert not _marker(workdir).exists()


def test_fifo_as_data_is_refused_without_reading_it(
    run_cli, workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pipe = tmp_path_factory.mktemp("pipes") / "pipe.npz"  # outside workdir: snapshot() would block reading it
    os.mkfifo(pipe)
    before = snapshot(workdir)
    result = _recalibrate(run_cli, workdir / "model.onnx", pipe, workdir / "out.onnx")
    _assert_clean_failure(result, ExitCode.USAGE, "pipe.npz: not a regular file or directory", workdir, before)


def _dynamic_batch_model(directory: Path) -> Path:
    source = conv_bn_model()
    for value in (source.graph.input[0], source.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return write_model(directory / "dynamic.onnx", source)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ((), "BatchNormalization 'bn': 0 element(s) per channel: the variance needs at least 1"),
        (("--match-torch",), "onnxruntime cannot run the model on it"),
    ],
    ids=["pooled", "match_torch"],
)
def test_zero_samples_with_a_dynamic_batch_is_refused(run_cli, workdir: Path, extra: tuple, reason: str) -> None:
    model = _dynamic_batch_model(workdir)
    np.savez(workdir / "zero.npz", X=np.ones((0, 4, 5, 5), np.float32))
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, workdir / "zero.npz", workdir / "out.onnx", *extra)
    _assert_clean_failure(result, ExitCode.USAGE, reason, workdir, before, model)


@pytest.mark.parametrize("builder", [pickled_object_array_npz, pickled_object_array_npy, plain_pickle])
def test_read_batch_never_unpickles(tmp_path: Path, builder: Callable[[Path], Path]) -> None:
    path = builder(tmp_path)
    with pytest.raises(UsageError, match=r"^--data .*: not a readable \.npz file"):
        read_batch(path)
    assert not _marker(tmp_path).exists()
    if builder is pickled_object_array_npy:  # the trap is armed: numpy with allow_pickle=True would spring it
        np.load(path, allow_pickle=True)
        assert _marker(tmp_path).is_dir()


def test_npz_batches_skips_non_files_in_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.npz").mkdir()
    np.savez(tmp_path / "real.npz", X=GOOD_X)
    assert [path.name for path in NpzBatches(tmp_path).files] == ["real.npz"]


def test_bad_data_in_a_real_process_has_no_traceback(workdir: Path) -> None:
    data = DATA_CASES["plain_npy"][0](workdir)
    before = snapshot(workdir)
    result = run_subprocess("recalibrate", workdir / "model.onnx", "--data", data, "-o", workdir / "out.onnx")
    _assert_clean_failure(result, ExitCode.USAGE, "not a readable .npz file", workdir, before, workdir / "model.onnx")


# --- the output side ---------------------------------------------------------------------------------------


def _external_data_model(directory: Path) -> Path:
    model, data = with_external_data(seeds.conv_bn(channels=(4, 6)), "model.onnx.data")
    (directory / "model.onnx.data").write_bytes(data)
    return write_model(directory / "model.onnx", model)


OUTPUTS: dict[str, tuple[Callable[[Path], list[object]], str]] = {
    "the_input": (lambda d: ["-o", d / "model.onnx"], "the output would overwrite the input"),
    "the_input_other_spelling": (lambda d: ["-o", d / "." / "model.onnx"], "the output would overwrite the input"),
    "a_directory": (lambda d: ["-o", d], "is a directory; give a file path"),
    "a_missing_directory": (lambda d: ["-o", d / "missing" / "out.onnx"], "output directory"),
    "the_data_file": (lambda d: ["-o", d / "good.npz"], "the output would overwrite the --data file"),
    "no_output": (lambda d: [], "give -o/--output OUT (or --in-place"),
    "output_and_in_place": (lambda d: ["-o", d / "out.onnx", "--in-place"], "either -o/--output or --in-place"),
    "json_into_a_missing_directory": (
        lambda d: ["-o", d / "out.onnx", "--json", d / "missing" / "r.json"],
        "does not exist",
    ),
    "json_is_a_directory": (lambda d: ["-o", d / "out.onnx", "--json", d], "--json"),
    "match_torch_with_onnx_convention": (
        lambda d: ["-o", d / "out.onnx", "--match-torch", "--convention", "onnx"],
        "cannot be combined with --convention onnx",
    ),
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_bad_output_is_a_usage_error(run_cli, workdir: Path, kind: str) -> None:
    arguments, reason = OUTPUTS[kind]
    model = workdir / "model.onnx"
    before = snapshot(workdir)
    result = run_cli("recalibrate", model, "--data", workdir / "good.npz", *arguments(workdir))
    _assert_clean_failure(result, ExitCode.USAGE, reason, workdir, before, model)


@pytest.mark.parametrize("link", ["symlink", "hard_link"])
def test_output_linked_to_the_input_is_refused(run_cli, workdir: Path, link: str) -> None:
    model = workdir / "model.onnx"
    (os.symlink if link == "symlink" else os.link)(model, workdir / "alias.onnx")
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, workdir / "good.npz", workdir / "alias.onnx")
    _assert_clean_failure(result, ExitCode.USAGE, "the output would overwrite the input", workdir, before, model)


def test_output_onto_the_inputs_external_data_file_is_refused(run_cli, workdir: Path) -> None:
    """Regression: ``-o model.onnx.data`` used to replace the data file the input model reads (exit 0)."""
    model = _external_data_model(workdir)
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, workdir / "good.npz", workdir / "model.onnx.data")
    _assert_clean_failure(
        result, ExitCode.USAGE, "the output would overwrite a file the model is read from", workdir, before, model
    )


def test_external_data_model_recalibrates_in_place_without_writing_into_its_data(run_cli, workdir: Path) -> None:
    model = _external_data_model(workdir)
    result = run_cli("recalibrate", model, "--data", workdir / "good.npz", "--in-place")
    assert result.code == 0, result.stderr
    # the new data file has the other name (the old one is never written into); the old one is kept and named
    # (a copy of the model may still read it: issue 14, defect 3)
    assert (workdir / "model.onnx.data").is_file()
    assert (workdir / "model.onnx.1.data").is_file()
    assert "kept " in result.stdout and "model.onnx.data" in result.stdout
    assert [path.name for path in workdir.iterdir() if path.name.startswith(".")] == []
    onnx.checker.check_model(onnx.load(model), full_check=True)


def test_failed_save_leaves_no_output_and_no_staging(run_cli, monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """The model is written last and atomically: a disk failure while writing leaves nothing behind."""
    from bnfold.files import serialize

    def fail(model, path, data=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(serialize, "write_model", fail)
    model = workdir / "model.onnx"
    before = snapshot(workdir)
    result = _recalibrate(run_cli, model, workdir / "good.npz", workdir / "out.onnx")
    assert result.code == ExitCode.WRITE_FAILED
    assert len(result.stderr_lines) == 1 and "No space left on device" in result.stderr_lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(workdir) == before
