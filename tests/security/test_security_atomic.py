"""Atomic writes: a failure or a kill mid-write leaves the previous state; output == input needs --in-place.

Model and external data are staged under a temporary directory beside the destination and renamed into place,
the model last. Failures are injected in this process (the writer or the rename raises) and in child processes
killed with SIGKILL at the worst moments (mid-write, between the data and the model rename).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from security_support import REPO_ROOT, conv_bn_model, snapshot, with_external_data, write_model

from bnfold.cli import _available_commands
from bnfold.errors import ExitCode
from fuzz import seeds


def _hidden(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


@pytest.fixture
def source_and_previous_output(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A foldable model and an existing output file (its previous version) beside it."""
    source = write_model(tmp_path / "model.onnx", conv_bn_model())
    output = tmp_path / "out.onnx"
    previous = b"previous output, must survive"
    output.write_bytes(previous)
    return source, output, previous


def test_writer_failure_leaves_previous_output_and_no_debris(
    run_cli, monkeypatch: pytest.MonkeyPatch, source_and_previous_output: tuple[Path, Path, bytes]
) -> None:
    source, output, previous = source_and_previous_output
    from bnfold.files import serialize

    real_write = serialize.write_model

    def write_half_then_fail(model, path, data=None):
        real_write(model, path, data)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partial file at the staged path
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serialize, "write_model", write_half_then_fail)
    before = snapshot(source.parent)
    result = run_cli("fold", source, "-o", output, "--no-verify")
    assert result.code == ExitCode.WRITE_FAILED
    assert result.stderr_lines == [line for line in result.stderr_lines if "No space left on device" in line]
    assert f"{output}: cannot write" in result.stderr  # the path given, not the hidden staging file
    assert len(result.stderr_lines) == 1 and "Traceback" not in result.stderr
    assert output.read_bytes() == previous
    assert snapshot(source.parent) == before  # no staged files left, input untouched


def test_failed_rename_leaves_previous_output_and_no_debris(
    run_cli, monkeypatch: pytest.MonkeyPatch, source_and_previous_output: tuple[Path, Path, bytes]
) -> None:
    source, output, previous = source_and_previous_output

    def refuse(src, dst, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    before = snapshot(source.parent)
    result = run_cli("fold", source, "-o", output, "--no-verify")
    assert result.code == ExitCode.WRITE_FAILED, result.stderr
    assert len(result.stderr_lines) == 1 and "Input/output error" in result.stderr
    assert output.read_bytes() == previous
    assert snapshot(source.parent) == before


def test_failed_write_of_new_output_leaves_nothing(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = write_model(tmp_path / "model.onnx", conv_bn_model())
    from bnfold.files import serialize

    def fail(model, path, data=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serialize, "write_model", fail)
    result = run_cli("fold", source, "-o", tmp_path / "new.onnx", "--no-verify")
    assert result.code == ExitCode.WRITE_FAILED
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


# --- real processes killed with SIGKILL -------------------------------------------------------------------

_CHILD_PRELUDE = """
import os, signal, sys, threading, time
from pathlib import Path
sys.path.insert(0, {repo!r})
"""

_KILL_AT_MODEL_RENAME = """
real_replace = os.replace
def replace_then_die(src, dst, *args, **kwargs):
    if Path(dst).name == {model_name!r}:
        os.kill(os.getpid(), signal.SIGKILL)  # the data file (if any) is in place, the model is not
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace_then_die
"""

_KILL_MID_WRITE = """
def watch(directory):
    while True:
        for staged in directory.glob(".*/*"):
            try:
                if staged.stat().st_size > 0:
                    os.kill(os.getpid(), signal.SIGKILL)  # a staged file is being written
            except FileNotFoundError:
                pass
        time.sleep(0.0005)
threading.Thread(target=watch, args=(Path({directory!r}),), daemon=True).start()
"""


def _large_model():
    """A Conv + BN with ~9 MiB of weights, so that writing it takes long enough to be interrupted."""
    return seeds.conv_bn(channels=(256, 1024))


def _run_child(script: str, argv: list[str]) -> int:
    code = textwrap.dedent(script) + "\nfrom bnfold.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    completed = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    return completed.returncode


@pytest.mark.parametrize("moment", ["model_rename", "mid_write"])
def test_process_killed_while_writing_output_leaves_previous_output(tmp_path: Path, moment: str) -> None:
    source = write_model(tmp_path / "model.onnx", _large_model())
    output = tmp_path / "out.onnx"
    previous = b"previous output, must survive"
    output.write_bytes(previous)
    input_before = source.read_bytes()
    if moment == "model_rename":
        script = _CHILD_PRELUDE.format(repo=str(REPO_ROOT)) + _KILL_AT_MODEL_RENAME.format(model_name="out.onnx")
    else:
        script = _CHILD_PRELUDE.format(repo=str(REPO_ROOT)) + _KILL_MID_WRITE.format(directory=str(tmp_path))
    code = _run_child(script, ["fold", str(source), "-o", str(output), "--no-verify"])
    assert code == -signal.SIGKILL
    assert output.read_bytes() == previous
    assert source.read_bytes() == input_before
    visible = sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith("."))
    assert visible == ["model.onnx", "out.onnx"]  # a killed process cannot clean its hidden staging directory


@pytest.mark.parametrize("moment", ["model_rename", "mid_write"])
def test_process_killed_during_in_place_fold_leaves_the_input_intact(tmp_path: Path, moment: str) -> None:
    source = write_model(tmp_path / "model.onnx", _large_model())
    before = source.read_bytes()
    if moment == "model_rename":
        script = _CHILD_PRELUDE.format(repo=str(REPO_ROOT)) + _KILL_AT_MODEL_RENAME.format(model_name="model.onnx")
    else:
        script = _CHILD_PRELUDE.format(repo=str(REPO_ROOT)) + _KILL_MID_WRITE.format(directory=str(tmp_path))
    code = _run_child(script, ["fold", str(source), "--in-place", "--no-verify"])
    assert code == -signal.SIGKILL
    assert source.read_bytes() == before
    onnx.checker.check_model(onnx.load(source))


def test_process_killed_during_in_place_fold_with_external_data(tmp_path: Path) -> None:
    model, data = with_external_data(_large_model(), "model.onnx.data")
    (tmp_path / "model.onnx.data").write_bytes(data)
    source = write_model(tmp_path / "model.onnx", model)
    before = snapshot(tmp_path)
    script = _CHILD_PRELUDE.format(repo=str(REPO_ROOT)) + _KILL_AT_MODEL_RENAME.format(model_name="model.onnx")
    code = _run_child(script, ["fold", str(source), "--in-place", "--no-verify"])
    assert code == -signal.SIGKILL
    after = snapshot(tmp_path)
    assert {name: after.get(name) for name in before} == before  # model and its data file untouched
    reloaded = onnx.load(source)  # resolves the external data: still consistent
    assert [node.op_type for node in reloaded.graph.node] == ["Conv", "BatchNormalization"]


# --- output == input ----------------------------------------------------------------------------------------


def _aliases(source: Path) -> dict[str, Path]:
    directory = source.parent
    (directory / "sub").mkdir()
    os.symlink(source, directory / "link.onnx")
    os.link(source, directory / "hard.onnx")
    return {
        "same_path": source,
        "dot_dot_spelling": directory / "sub" / ".." / source.name,
        "symlink": directory / "link.onnx",
        "hard_link": directory / "hard.onnx",
    }


@pytest.mark.parametrize("alias", ["same_path", "dot_dot_spelling", "symlink", "hard_link"])
def test_output_equal_to_input_is_refused_without_in_place(run_cli, tmp_path: Path, alias: str) -> None:
    source = write_model(tmp_path / "model.onnx", conv_bn_model())
    output = _aliases(source)[alias]
    before = snapshot(tmp_path)
    result = run_cli("fold", source, "-o", output)
    assert result.code == 2, result.stderr
    assert len(result.stderr_lines) == 1 and "--in-place" in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.skipif("lower-training" not in _available_commands(), reason="no lower-training subcommand")
def test_lower_training_refuses_output_equal_to_input(run_cli, tmp_path: Path) -> None:
    source = write_model(tmp_path / "model.onnx", conv_bn_model())
    before = snapshot(tmp_path)
    result = run_cli("lower-training", source, "-o", tmp_path / "sub" / ".." / "model.onnx")
    assert result.code == 2, result.stderr
    assert snapshot(tmp_path) == before


def test_in_place_replaces_the_file_atomically(run_cli, tmp_path: Path) -> None:
    source = write_model(tmp_path / "model.onnx", conv_bn_model())
    pristine = write_model(tmp_path / "pristine.onnx", conv_bn_model())
    inode_before = source.stat().st_ino
    with open(source, "rb") as reader_of_old_file:
        result = run_cli("fold", source, "--in-place")
        assert result.code == 0, result.stderr
        assert reader_of_old_file.read() == pristine.read_bytes()  # a reader of the old file saw no change
    assert source.stat().st_ino != inode_before  # replaced by rename, not rewritten
    assert [node.op_type for node in onnx.load(source).graph.node] == ["Conv"]
    assert _hidden(tmp_path) == []
