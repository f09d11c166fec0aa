"""The output plan (issue 14): every path a command writes is checked before anything is written.

Regressions for the defects of the hostile-input campaign that the plan closes (numbers as in the issue):

1. a report flag (``--json``, ``--junit-xml``, ``--save-inputs``) naming the input, its data, ``--data`` or the
   model output used to destroy that file and exit 0;
2. ``lower-training -o m.onnx.data`` replaced the data file ``m.onnx`` reads;
4. ``--keep-failed`` wrote the failed model over the input (``x.failed.onnx -o x.onnx``);
5. ``-o`` naming a device node replaced the node by a regular file;
12. ``-o ''`` wrote the default path, ``-o nodir/`` created a file ``nodir``;
13. a failed write exited 1 (the code of a verification mismatch) naming the hidden staging file.

Each refusal is a usage error (exit 2) with one line naming the flag and the path, and leaves every file as it was.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from security_support import CliResult, conv_bn_model, snapshot, with_external_data, write_model

from bnfold.errors import ExitCode
from bnfold.files import serialize
from fuzz import seeds


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """``model.onnx`` with its weights in ``model.onnx.data``, and ``cal.npz`` matching its input."""
    directory = tmp_path / "work"
    directory.mkdir()
    model, data = with_external_data(conv_bn_model(), "model.onnx.data")
    (directory / "model.onnx.data").write_bytes(data)
    write_model(directory / "model.onnx", model)
    np.savez(directory / "cal.npz", X=np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32))
    return directory


@pytest.fixture
def specials(tmp_path: Path) -> Path:
    """A directory for device nodes and FIFOs (apart from ``workdir``: reading a FIFO to snapshot it blocks)."""
    directory = tmp_path / "specials"
    directory.mkdir()
    return directory


def _char_device(directory: Path) -> Path:
    """A character device like ``/dev/null`` (``mknod null c 1 3``); skips where mknod is not permitted."""
    path = directory / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError) as error:
        pytest.skip(f"cannot create a device node here: {error}")
    return path


def _fifo(directory: Path) -> Path:
    path = directory / "pipe"
    os.mkfifo(path)
    return path


def _assert_refused(result: CliResult, reason: str, workdir: Path, before: dict[str, str]) -> None:
    assert result.code == ExitCode.USAGE, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("bnfold: error: ") and reason in result.stderr_lines[0], result.stderr
    assert snapshot(workdir) == before  # nothing written, replaced or left behind


# --- the matrix: every command × each of its output flags × what the flag points at --------------------------

# command → (its arguments before the output flags, its output flags with a valid path each)
COMMANDS: dict[str, tuple[Callable[[Path], list[object]], dict[str, str]]] = {
    "fold": (
        lambda w: ["fold", w / "model.onnx"],
        {"-o": "out.onnx", "--json": "report.json", "--junit-xml": "report.xml", "--save-inputs": "inputs.npz"},
    ),
    "recalibrate": (
        lambda w: ["recalibrate", w / "model.onnx", "--data", w / "cal.npz"],
        {"-o": "out.onnx", "--json": "report.json"},
    ),
    "lower-training": (lambda w: ["lower-training", w / "model.onnx"], {"-o": "out.onnx"}),
    "check": (lambda w: ["check", w / "model.onnx"], {"--json": "report.json", "--junit-xml": "report.xml"}),
    "verify": (
        lambda w: ["verify", w / "model.onnx", w / "model.onnx"],
        {"--json": "report.json", "--junit-xml": "report.xml", "--save-inputs": "inputs.npz"},
    ),
}
TARGETS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "the_input": (lambda work, _: work / "model.onnx", "would overwrite the input"),
    "the_inputs_data": (lambda work, _: work / "model.onnx.data", "would overwrite a file the model is read from"),
    "another_output": (lambda work, _: work / "shared.out", "writes the same file"),
    "a_character_device": (lambda _, special: _char_device(special), "is a character device"),
    "a_fifo": (lambda _, special: _fifo(special), "is a FIFO"),
    "a_missing_folder": (lambda work, _: work / "missing" / "x.out", "does not exist"),
    "a_directory": (lambda work, _: work, "is a directory"),
}
MATRIX = [
    (command, flag, target)
    for command, (_, flags) in COMMANDS.items()
    for flag in flags
    for target in TARGETS
    if target != "another_output" or len(flags) > 1
]


def _argv(command: str, work: Path, flag: str | None = None, target: Path | None = None) -> list[object]:
    """``command`` with every output flag set to a valid path, ``flag`` pointing at ``target`` instead (for
    "another output": the same file as one other flag)."""
    prefix, flags = COMMANDS[command]
    paths: dict[str, object] = {name: work / file for name, file in flags.items()}
    if flag is not None:
        paths[flag] = target
        if target is not None and target.name == "shared.out":
            paths[next(name for name in flags if name != flag)] = target
    return [*prefix(work), *(item for pair in paths.items() for item in pair)]


@pytest.mark.parametrize(("command", "flag", "target_name"), MATRIX, ids=["-".join(case) for case in MATRIX])
def test_an_output_flag_may_not_point_at(
    run_cli, workdir: Path, specials: Path, command: str, flag: str, target_name: str
) -> None:
    make_target, reason = TARGETS[target_name]
    target = make_target(workdir, specials)
    before = snapshot(workdir)
    result = run_cli(*_argv(command, workdir, flag, target))
    _assert_refused(result, reason, workdir, before)
    if flag != "-o" and target_name != "another_output":
        assert flag in result.stderr  # the message names the flag
    if target_name == "a_character_device":
        assert stat.S_ISCHR(os.stat(target).st_mode)  # the device node is still a device node


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_output_flag_works_so_the_refusals_are_meaningful(run_cli, workdir: Path, command: str) -> None:
    result = run_cli(*_argv(command, workdir))
    assert result.code in (ExitCode.OK, ExitCode.FAILED), result.stderr  # (check: 1 = a foldable BN found)
    assert set(COMMANDS[command][1].values()) <= {path.name for path in workdir.iterdir()}


# --- defect 1: the other commands' report flags -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (lambda w: ["-o", w / "o.onnx", "--json", w / "model.onnx"], "--json"),
        (lambda w: ["-o", w / "o.onnx", "--json", w / "cal.npz"], "would overwrite the --data file"),
        (lambda w: ["-o", w / "o.onnx", "--json", w / "o.onnx"], "writes the same file"),
        (lambda w: ["-o", w / "o.onnx", "--json", w / "model.onnx.data"], "a file the model is read from"),
    ],
    ids=["json_is_the_input", "json_is_the_data", "json_is_the_output", "json_is_the_inputs_external_data"],
)
def test_recalibrate_refuses_a_report_over_a_file_it_uses(run_cli, workdir: Path, arguments, reason: str) -> None:
    before = snapshot(workdir)
    result = run_cli("recalibrate", workdir / "model.onnx", "--data", workdir / "cal.npz", *arguments(workdir))
    _assert_refused(result, reason, workdir, before)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (lambda w: ["check", w / "model.onnx", "--json", w / "model.onnx"], "--json"),
        (lambda w: ["check", w / "model.onnx", "--junit-xml", w / "model.onnx"], "--junit-xml"),
        (lambda w: ["verify", w / "model.onnx", w / "model.onnx", "--json", w / "model.onnx"], "--json"),
        (lambda w: ["verify", w / "model.onnx", w / "model.onnx", "--save-inputs", w / "model.onnx"], "--save-inputs"),
        (lambda w: ["verify", w / "model.onnx", w / "model.onnx", "--json", w / "r", "--junit-xml", w / "r"], "same"),
    ],
    ids=["check_json", "check_junit", "verify_json", "verify_save_inputs", "verify_two_reports_one_file"],
)
def test_check_and_verify_refuse_a_report_over_a_file_they_use(run_cli, workdir: Path, argv, reason: str) -> None:
    before = snapshot(workdir)
    result = run_cli(*argv(workdir))
    _assert_refused(result, reason, workdir, before)


def test_fold_refuses_a_report_over_the_outputs_external_data(run_cli, workdir: Path) -> None:
    """The output keeps external data in ``o.onnx.data``: a report there would replace it after the commit."""
    # (a folded weight of 1 KiB or more: smaller tensors are written into the model, and no data file at all)
    model, data = with_external_data(seeds.conv_bn(channels=(4, 16)), "model.onnx.data")
    (workdir / "model.onnx.data").write_bytes(data)
    write_model(workdir / "model.onnx", model)
    before = snapshot(workdir)
    result = run_cli("fold", workdir / "model.onnx", "-o", workdir / "o.onnx", "--json", workdir / "o.onnx.data")
    _assert_refused(result, "writes the same file", workdir, before)


def test_batch_refuses_a_report_over_an_input(run_cli, workdir: Path, tmp_path: Path) -> None:
    before = snapshot(workdir)
    result = run_cli("fold", workdir / "model.onnx", f"{tmp_path / 'out'}/", "--json", workdir / "model.onnx")
    _assert_refused(result, "would overwrite the input", workdir, before)


# --- defect 2: lower-training onto the input's data file ----------------------------------------------------


def test_lower_training_refuses_the_inputs_data_file(run_cli, workdir: Path) -> None:
    before = snapshot(workdir)
    result = run_cli("lower-training", workdir / "model.onnx", "-o", workdir / "model.onnx.data")
    _assert_refused(result, "a file the model is read from", workdir, before)


def test_lower_training_refuses_a_device(run_cli, workdir: Path, specials: Path) -> None:
    device = _char_device(specials)
    result = run_cli("lower-training", workdir / "model.onnx", "-o", device)
    assert result.code == ExitCode.USAGE and "is a character device" in result.stderr
    assert stat.S_ISCHR(os.stat(device).st_mode)


# --- defect 4: --keep-failed over the input ----------------------------------------------------------------


def test_keep_failed_never_writes_over_the_input(run_cli, tmp_path: Path) -> None:
    source = write_model(tmp_path / "x.failed.onnx", seeds.conv_bn())
    before = snapshot(tmp_path)
    result = run_cli("fold", source, "-o", tmp_path / "x.onnx", "--keep-failed", "--atol", "0", "--rtol", "0")
    _assert_refused(result, "--keep-failed", tmp_path, before)
    assert "would overwrite the input" in result.stderr


# --- defect 5: device nodes and FIFOs as the model output --------------------------------------------------


@pytest.mark.parametrize("command", ["fold", "recalibrate", "lower-training"])
def test_a_device_node_output_is_refused_and_left_a_device(run_cli, workdir: Path, specials: Path, command: str):
    device = _char_device(specials)
    extra = ["--data", workdir / "cal.npz"] if command == "recalibrate" else []
    result = run_cli(command, workdir / "model.onnx", *extra, "-o", device)
    assert result.code == ExitCode.USAGE, result.stderr
    assert "is a character device" in result.stderr and len(result.stderr_lines) == 1
    assert stat.S_ISCHR(os.stat(device).st_mode)


# --- defect 12: empty and folder-like output paths --------------------------------------------------------


@pytest.mark.parametrize("command", ["fold", "recalibrate", "lower-training"])
@pytest.mark.parametrize(
    ("output", "reason"), [("", "an empty path"), ("nodir/", "is a directory")], ids=["empty", "missing_folder"]
)
def test_empty_or_folder_output_is_a_usage_error(
    run_cli, workdir: Path, monkeypatch: pytest.MonkeyPatch, command: str, output: str, reason: str
) -> None:
    monkeypatch.chdir(workdir)
    extra = ["--data", "cal.npz"] if command == "recalibrate" else []
    before = snapshot(workdir)
    result = run_cli(command, "model.onnx", *extra, "-o", output)
    _assert_refused(result, reason, workdir, before)
    assert not (workdir / "nodir").exists() and not (workdir / "model.folded.onnx").exists()


# --- defect 13: a failed write has its own exit code and names the path given ------------------------------


@pytest.mark.parametrize("command", ["fold", "recalibrate", "lower-training"])
def test_a_failed_write_exits_6_naming_the_output(
    run_cli, workdir: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    def disk_full(model, path, data=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serialize, "write_model", disk_full)
    output = workdir / "o.onnx"
    extra = ["--data", workdir / "cal.npz"] if command == "recalibrate" else []
    before = snapshot(workdir)
    result = run_cli(command, workdir / "model.onnx", *extra, "-o", output, *(["--no-verify"] * (command == "fold")))
    assert result.code == ExitCode.WRITE_FAILED == 6, result.stderr
    assert result.stderr_lines == [f"bnfold: error: {output}: cannot write (No space left on device)"]
    assert snapshot(workdir) == before  # no staging folder left
