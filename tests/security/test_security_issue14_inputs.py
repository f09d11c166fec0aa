"""Issue 14, the read side: input data, model checks, error lines and signals (defects 6, 8-11, 14-16).

Each test names the defect it covers. Every failure must be one ``bnfold: error:`` line with the documented exit
code, the inputs unchanged and nothing left behind (no output, no hidden staging directory).

- 6: big-endian ``.npz`` arrays are converted to native byte order (``recalibrate --data``, ``--load-inputs``);
- 8: FIFOs and other non-regular files are refused for every read path, never opened for reading;
- 9: an ``.npz`` member's header (dtype, shape) is checked before its data is inflated; declared sizes are capped;
- 10: Ctrl-C while the modules load, and SIGTERM during a write, end with one line and exit 130 / 143;
- 11: ``verify --load-inputs`` with a ``.npy``, an empty file or a member that is no array: usage error (2);
- 14: running out of memory names the input; 15: a file name with a newline still gives one (escaped) line;
- 16: BatchNormalization parameters whose dtypes break the schema make the model invalid (exit 3).
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from security_support import REPO_ROOT, CliResult, conv_bn_model, run_subprocess, snapshot, write_model

from bnfold.errors import ExitCode, InvalidModelError, UsageError
from bnfold.files.checks import check_model_proto
from bnfold.files.inputs import MAX_NPZ_BYTES, read_npz, shown_path
from bnfold.validate.inputs import input_specs, load_inputs

# conv_bn_model(): X[1, 4, 5, 5] float32 → Conv → BN → Y.
GOOD_X = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """``model.onnx`` (fixed batch of 1), ``dynamic.onnx`` (batch dim ``N``) and a good batch ``good.npz``."""
    write_model(tmp_path / "model.onnx", conv_bn_model())
    dynamic = conv_bn_model()
    for value in (dynamic.graph.input[0], dynamic.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    write_model(tmp_path / "dynamic.onnx", dynamic)
    np.savez(tmp_path / "good.npz", X=GOOD_X)
    return tmp_path


def _assert_one_line_failure(result: CliResult, code: int, reason: str) -> None:
    assert result.code == code, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("bnfold: error: "), line
    assert "Traceback" not in result.stderr and "internal error" not in line
    assert reason in line, line


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _bomb(path: Path, shape: tuple[int, ...], zeros: int) -> Path:
    """An ``.npz`` whose member ``X.npy`` declares ``shape`` and inflates to ``zeros`` zero bytes of data."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("X.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header(shape))
        block = bytes(1 << 20)
        for _ in range(zeros >> 20):
            member.write(block)
    return path


def _fifo(directory: Path) -> Path:
    # Outside the snapshot directory: snapshot() would block reading it.
    fifo = directory.parent / f"{directory.name}-pipe.npz"
    os.mkfifo(fifo)
    return fifo


# --- 6: big-endian data -------------------------------------------------------------------------------------


def test_recalibrate_converts_big_endian_data_to_native_byte_order(run_cli, workdir: Path) -> None:
    """Defect 6: the bytes used to reach onnxruntime unswapped (non-finite or zero variances)."""
    np.savez(workdir / "big.npz", X=GOOD_X.astype(">f4"))
    native = run_cli("recalibrate", workdir / "model.onnx", "--data", workdir / "good.npz", "-o", workdir / "n.onnx")
    big = run_cli("recalibrate", workdir / "model.onnx", "--data", workdir / "big.npz", "-o", workdir / "b.onnx")
    assert native.code == 0 and big.code == 0, big.stderr
    assert (workdir / "n.onnx").read_bytes() == (workdir / "b.onnx").read_bytes()
    variance = next(t for t in onnx.load(workdir / "b.onnx").graph.initializer if t.name == "bn_var")
    assert np.all(numpy_helper.to_array(variance) > 0)


def test_load_inputs_converts_big_endian_arrays(tmp_path: Path) -> None:
    """Defect 6 for ``--load-inputs``: the arrays come back native, with the same values."""
    np.savez(tmp_path / "big.npz", X=GOOD_X.astype(">f4"))
    (batch,) = load_inputs(tmp_path / "big.npz", input_specs(conv_bn_model()))
    assert batch["X"].dtype == np.float32 and batch["X"].dtype.isnative
    np.testing.assert_array_equal(batch["X"], GOOD_X)


# --- 8: FIFOs -----------------------------------------------------------------------------------------------


def test_verify_refuses_a_fifo_as_load_inputs_without_blocking(workdir: Path) -> None:
    """Defect 8: ``verify --load-inputs FIFO`` blocked forever (run in a child process: the old code hangs)."""
    fifo = _fifo(workdir)
    model = workdir / "model.onnx"
    result = run_subprocess("verify", model, model, "--load-inputs", fifo)
    _assert_one_line_failure(result, ExitCode.USAGE, "a FIFO, not a regular file")


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "{fifo}"],
        ["fold", "{fifo}", "-o", "{dir}/out.onnx", "--no-verify"],
        ["verify", "{fifo}", "{dir}/model.onnx"],
        ["verify", "{dir}/model.onnx", "{fifo}"],
        ["recalibrate", "{fifo}", "--data", "{dir}/good.npz", "-o", "{dir}/out.onnx"],
        ["lower-training", "{fifo}", "-o", "{dir}/out.onnx"],
    ],
    ids=["check", "fold", "verify-original", "verify-candidate", "recalibrate", "lower-training"],
)
def test_every_command_refuses_a_fifo_as_model(run_cli, workdir: Path, argv: list[str]) -> None:
    """Defect 8 for model paths: the loaders refuse a non-regular file before opening it (exit 3)."""
    fifo = _fifo(workdir)
    before = snapshot(workdir)
    result = run_cli(*(arg.format(fifo=fifo, dir=workdir) for arg in argv))
    _assert_one_line_failure(result, ExitCode.INVALID_MODEL, "not a regular file")
    assert snapshot(workdir) == before


# --- 9: decompression bombs and the size cap ------------------------------------------------------------------


@pytest.fixture
def bytes_inflated(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the bytes every zip member read returns (what was inflated)."""
    total = [0]
    original = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = original(self, n)
        total[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    return lambda: total[0]


@pytest.mark.parametrize("command", ["verify", "recalibrate"])
def test_a_member_of_the_wrong_shape_is_refused_before_it_is_inflated(
    run_cli, workdir: Path, bytes_inflated: Callable[[], int], command: str
) -> None:
    """Defect 9: 64 MiB of zeros (64 KiB compressed) declared as X[16384, 4, 16, 16]: refused from its header."""
    bomb = _bomb(workdir / "bomb.npz", (16384, 4, 16, 16), 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    model = workdir / "model.onnx"
    if command == "verify":
        result = run_cli("verify", model, model, "--load-inputs", bomb)
    else:
        result = run_cli("recalibrate", model, "--data", bomb, "-o", workdir / "out.onnx")
    _assert_one_line_failure(result, ExitCode.USAGE, "axis 0 is 16384, the model fixes it to 1")
    assert bytes_inflated() < 1 << 16  # the headers only, not the 64 MiB


@pytest.mark.parametrize("flag", ["--load-inputs", "--data"])
def test_declared_sizes_beyond_the_cap_are_refused_unread(tmp_path: Path, flag: str) -> None:
    """Defect 9: a dynamic batch dim cannot be checked against the model; the declared size is capped."""
    rows = MAX_NPZ_BYTES // (4 * 5 * 5 * 4) + 1
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        archive.writestr("X.npy", _npy_header((rows, 4, 5, 5)) + bytes(64))
    with pytest.raises(UsageError, match=rf"^{flag} .*big\.npz: the arrays declare \d+ bytes, more than the"):
        read_npz(tmp_path / "big.npz", flag)


# --- 11: --load-inputs errors -------------------------------------------------------------------------------


def _npy(directory: Path) -> Path:
    np.save(directory / "x.npy", GOOD_X)
    return directory / "x.npy"


def _empty(directory: Path) -> Path:
    (directory / "empty.npz").write_bytes(b"")
    return directory / "empty.npz"


def _not_an_array(directory: Path) -> Path:
    with zipfile.ZipFile(directory / "bytes.npz", "w") as archive:
        archive.writestr("X", b"abc")
    return directory / "bytes.npz"


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_npy, "x.npy: not a readable .npz file (no zip archive header)"),
        (_empty, "empty.npz: not a readable .npz file (the file is empty)"),
        (_not_an_array, "bytes.npz: not a readable .npz file (member 'X' is not an .npy array)"),
    ],
    ids=["npy", "empty", "bad_key"],
)
def test_verify_load_inputs_errors_are_usage_errors(run_cli, workdir: Path, build, reason: str) -> None:
    """Defect 11: these were "internal error", exit 1."""
    data = build(workdir)
    model = workdir / "model.onnx"
    before = snapshot(workdir)
    result = run_cli("verify", model, model, "--load-inputs", data)
    _assert_one_line_failure(result, ExitCode.USAGE, f"--load-inputs {data.parent}/{reason}")
    assert snapshot(workdir) == before


# --- the table: read paths × hostile data ----------------------------------------------------------------------

DATA_KINDS: dict[str, Callable[[Path], Path]] = {
    "fifo": _fifo,
    "directory": lambda d: (d / "folder.npz").mkdir() or d / "folder.npz",
    "missing": lambda d: d / "absent.npz",
    "big_endian": lambda d: np.savez(d / "big.npz", X=GOOD_X.astype(">f4")) or d / "big.npz",
    "bomb": lambda d: _bomb(d / "bomb.npz", (4096, 4, 16, 16), 16 << 20),
    "bad_key": lambda d: np.savez(d / "key.npz", Z=GOOD_X) or d / "key.npz",
    "empty_file": _empty,
}
# (read path, kind) → (exit code, reason in the error line); 0: succeeds.
EXPECTED: dict[tuple[str, str], tuple[int, str]] = {
    ("--load-inputs", "fifo"): (2, "a FIFO, not a regular file"),
    ("--load-inputs", "directory"): (2, "folder.npz: a directory, not a regular file"),
    ("--load-inputs", "missing"): (2, "absent.npz: no such file"),
    ("--load-inputs", "big_endian"): (0, ""),
    ("--load-inputs", "bomb"): (2, "axis 0 is 4096, the model fixes it to 1"),
    ("--load-inputs", "bad_key"): (2, "key 'Z' is neither an input name nor '<iteration>/<input name>'"),
    ("--load-inputs", "empty_file"): (2, "not a readable .npz file (the file is empty)"),
    ("--data", "fifo"): (2, "not a regular file or directory"),
    ("--data", "directory"): (2, "folder.npz: the directory holds no .npz file"),
    ("--data", "missing"): (2, "absent.npz: no such file or directory"),
    ("--data", "big_endian"): (0, ""),
    ("--data", "bomb"): (2, "axis 0 is 4096, the model fixes it to 1"),
    ("--data", "bad_key"): (2, "missing input(s) X; unknown key(s) Z (model inputs: X)"),
    ("--data", "empty_file"): (2, "not a readable .npz file (the file is empty)"),
}


@pytest.mark.parametrize(("flag", "kind"), sorted(EXPECTED))
def test_read_paths_with_hostile_data(run_cli, workdir: Path, flag: str, kind: str) -> None:
    """Defects 6, 8, 9, 11 as a table: every read path of data × every hostile kind of data."""
    data = DATA_KINDS[kind](workdir)
    model = workdir / "model.onnx"
    if flag == "--load-inputs":
        argv = ["verify", model, model, "--load-inputs", data]
    else:
        argv = ["recalibrate", model, "--data", data, "-o", workdir / "out.onnx"]
    before = snapshot(workdir)
    result = run_subprocess(*argv) if kind == "fifo" else run_cli(*argv)  # (a child: the old code blocked)
    code, reason = EXPECTED[flag, kind]
    if code == 0:
        assert result.code == 0, result.stderr
        return
    _assert_one_line_failure(result, code, reason)
    assert snapshot(workdir) == before


# --- 10: Ctrl-C while importing, SIGTERM while writing ----------------------------------------------------------


def _run_python(script: str, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("signal_name", "code", "line"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]
)
def test_a_signal_while_the_modules_load_ends_with_one_line(
    workdir: Path, signal_name: str, code: int, line: str
) -> None:
    """Defect 10: a signal while the subcommand's modules were imported printed a KeyboardInterrupt traceback."""
    completed = _run_python(
        f"""
        import os, signal, sys
        import bnfold.cli as cli
        real = cli._available_commands
        def interrupted(*args):
            os.kill(os.getpid(), signal.{signal_name})
            return real(*args)
        cli._available_commands = interrupted
        sys.exit(cli.main(["fold", "model.onnx", "-o", "out.onnx"]))
        """,
        cwd=workdir,
    )
    assert completed.returncode == code, completed.stderr
    assert completed.stderr.strip() == f"bnfold: {line}"
    assert not (workdir / "out.onnx").exists()


def test_sigterm_during_a_write_removes_the_staging_directory(workdir: Path) -> None:
    """Defect 10: SIGTERM in the middle of writing the model left the hidden staging folder behind."""
    before = snapshot(workdir)
    completed = _run_python(
        """
        import os, signal, sys
        from bnfold.files import serialize
        real = serialize.write_model
        def write_then_terminate(model, path, *args, **kwargs):
            real(model, path, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler raises at the next bytecode
                pass
        serialize.write_model = write_then_terminate
        from bnfold.cli import main
        sys.exit(main(["fold", "model.onnx", "-o", "out.onnx", "--no-verify"]))
        """,
        cwd=workdir,
    )
    assert completed.returncode == 143, completed.stderr
    assert completed.stderr.strip() == "bnfold: terminated"
    assert snapshot(workdir) == before  # no output, no hidden .out.onnx.* directory


def test_ctrl_c_during_a_write_still_ends_with_130(run_cli, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour defect 10 asks the others to match (in process: the CLI restores the SIGTERM handler)."""
    from bnfold.files import serialize

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serialize, "write_model", interrupt)
    before = snapshot(workdir)
    result = run_cli("fold", workdir / "model.onnx", "-o", workdir / "out.onnx", "--no-verify")
    assert (result.code, result.stderr.strip()) == (130, "bnfold: interrupted")
    assert snapshot(workdir) == before


# --- 14, 15: error lines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")], ids=["MemoryError", "ENOMEM"]
)
def test_out_of_memory_names_the_input(run_cli, workdir: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    """Defect 14: "bnfold: error: Cannot allocate memory" did not say which file."""
    from bnfold.files import load

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(load, "check_model_proto", exhausted)
    model = workdir / "model.onnx"
    result = run_cli("fold", model, "-o", workdir / "out.onnx", "--no-verify")
    _assert_one_line_failure(result, ExitCode.FAILED, f"{model}: out of memory")


@pytest.mark.parametrize("content", [None, b"garbage"], ids=["missing", "garbage"])
@pytest.mark.parametrize("command", ["check", "fold"])
def test_a_file_name_with_a_newline_gives_one_escaped_line(
    run_cli, tmp_path: Path, content: bytes | None, command: str
) -> None:
    """Defect 15: ``bnfold check $'bad\\nname.onnx'`` printed its error on two lines."""
    model = tmp_path / "bad\nname.onnx"
    if content is not None:
        model.write_bytes(content)
    result = run_cli(command, model)
    _assert_one_line_failure(result, ExitCode.INVALID_MODEL, repr(str(model)))


def test_shown_path_escapes_control_characters_only() -> None:
    assert shown_path("plain/näme.onnx") == "plain/näme.onnx"
    assert shown_path("a\nb\tc.onnx") == "'a\\nb\\tc.onnx'"
    assert shown_path(os.fsdecode(b"\xff.onnx")) == "'\\udcff.onnx'"


# --- 16: BatchNormalization parameters that break the schema's type constraints --------------------------------


def _bn_variant(dtypes: dict[str, type], opset: int | None = None) -> onnx.ModelProto:
    model = conv_bn_model()
    if opset is not None:
        model.opset_import[0].version = opset
    for tensor in model.graph.initializer:
        if tensor.name in dtypes:
            array = numpy_helper.to_array(tensor).astype(dtypes[tensor.name])
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


SCHEMA_VIOLATIONS = {
    "fp16_fp64_mix": ({"bn_gamma": np.float16, "bn_beta": np.float64}, None, "B 'bn_beta' is double but scale is"),
    "int64_mean": ({"bn_mean": np.int64}, None, "input_mean 'bn_mean' is int64, which T2 does not allow"),
    "opset9_fp64_stats": ({"bn_mean": np.float64, "bn_var": np.float64}, 9, "mean 'bn_mean' is double but scale"),
    "opset14_mean_var_mix": ({"bn_mean": np.float64}, 14, "input_var 'bn_var' is float but input_mean is double"),
}


@pytest.mark.parametrize("kind", sorted(SCHEMA_VIOLATIONS))
def test_batch_norm_dtypes_that_break_the_schema_are_an_invalid_model(run_cli, tmp_path: Path, kind: str) -> None:
    """Defect 16: these folded with ``--no-verify`` and exit 0; now refused like other schema violations."""
    dtypes, opset, reason = SCHEMA_VIOLATIONS[kind]
    model = write_model(tmp_path / "model.onnx", _bn_variant(dtypes, opset))
    before = snapshot(tmp_path)
    result = run_cli("fold", model, "-o", tmp_path / "out.onnx", "--no-verify")
    _assert_one_line_failure(result, ExitCode.INVALID_MODEL, reason)
    assert snapshot(tmp_path) == before
    with pytest.raises(InvalidModelError, match="BatchNormalization"):
        check_model_proto(_bn_variant(dtypes, opset), source="m")


@pytest.mark.parametrize(
    ("dtypes", "opset"),
    [
        ({"bn_gamma": np.float16, "bn_beta": np.float16, "bn_mean": np.float64, "bn_var": np.float64}, 17),
        ({"bn_mean": np.float64, "bn_var": np.float64}, 14),
    ],
    ids=["opset17_T1_T2_differ", "opset14_U_differs"],
)
def test_batch_norm_dtypes_the_schema_allows_still_load(dtypes: dict[str, type], opset: int) -> None:
    """The check follows the opset: from 14 the statistics may differ from X, from 15 scale/B too."""
    check_model_proto(_bn_variant(dtypes, opset), source="m")
