"""Issue 14, the rest: files other programs still read, concurrent writers, a failed recalibrate fold, signals
in batch workers and model files swapped after their check (defects 3 and 7, and four findings of the review).

- 3: ``--in-place`` (``fold`` and ``recalibrate``) deleted the input's old data file although a copy of the model
  still read it. Now it is kept, never written into later, and named in the output and the JSON;
- 7: two processes writing the same ``-o`` with external data could pair one's model with the other's data file.
  Commits of one output now run under an advisory lock;
- ``recalibrate --fold`` wrote the folded model although its verification failed; now, as ``fold``: exit 1, one
  line, nothing written;
- SIGTERM to a batch's process group killed the workers outright, leaving their hidden staging folders;
- a model file swapped for a FIFO after its check was opened and read (blocking).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from security_support import REPO_ROOT, conv_bn_model, snapshot, with_external_data, write_model

from bnfold.errors import ExitCode, InvalidModelError

CHANNELS = 16  # a folded weight of 16 x 16 x 3 x 3 floats (9 KiB) goes to the output's data file
GOOD_X = np.random.default_rng(0).standard_normal((1, CHANNELS, 5, 5)).astype(np.float32)


def _wide_conv_bn(scale: float = 1.0, graph_name: str = "conv_bn") -> onnx.ModelProto:
    """``X[1, 16, 5, 5] → Conv(W, B) → BatchNormalization → Y`` with random weights (``W`` times ``scale``)."""
    rng = np.random.default_rng(1)
    arrays = {
        "W": rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * np.float32(scale),
        "B": rng.standard_normal(CHANNELS).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32),
        "bias": rng.standard_normal(CHANNELS).astype(np.float32),
        "mean": rng.standard_normal(CHANNELS).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["C"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["C", "scale", "bias", "mean", "var"], ["Y"]),
    ]
    shape = [1, CHANNELS, 5, 5]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(array, name) for name, array in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(directory: Path, name: str, *, scale: float = 1.0, graph_name: str = "conv_bn") -> Path:
    """``directory/name`` (:func:`_wide_conv_bn`) with its weights in ``name.data``."""
    model, data = with_external_data(_wide_conv_bn(scale, graph_name), f"{name}.data")
    (directory / f"{name}.data").write_bytes(data)
    return write_model(directory / name, model)


def _run(path: Path) -> np.ndarray:
    """``Y`` of the model file at ``path`` on GOOD_X (onnxruntime, optimisations off)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"X": GOOD_X})[0]


def _hidden(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


# --- 3: in place, the old data file is kept ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_in_place_keeps_the_old_data_file_a_copy_still_reads(run_cli, tmp_path: Path, command: str) -> None:
    """Defect 3: ``a.onnx --in-place`` deleted ``a.onnx.data`` although ``b.onnx`` (a copy of ``a.onnx``) read it."""
    source = _external(tmp_path, "a.onnx")
    data = (tmp_path / "a.onnx.data").read_bytes()
    shutil.copy(source, tmp_path / "b.onnx")
    expected = _run(tmp_path / "b.onnx")
    np.savez(tmp_path.parent / f"{tmp_path.name}-cal.npz", X=GOOD_X)
    arguments = ["--no-verify"] if command == "fold" else ["--data", tmp_path.parent / f"{tmp_path.name}-cal.npz"]
    report = tmp_path.parent / f"{tmp_path.name}-report.json"
    result = run_cli(command, source, "--in-place", *arguments, "--json", report)
    assert result.code == ExitCode.OK, result.stderr
    assert (tmp_path / "a.onnx.data").read_bytes() == data  # kept, unchanged
    np.testing.assert_array_equal(_run(tmp_path / "b.onnx"), expected)  # the copy still works
    onnx.checker.check_model(os.fspath(source), full_check=True)
    assert "a.onnx.data" not in {entry.value for t in onnx.load(source).graph.initializer for entry in t.external_data}
    assert "kept " in result.stdout and "a.onnx.data" in result.stdout  # and the user is told
    if command == "fold":
        assert json.loads(report.read_text())["kept_data"] == [str((tmp_path / "a.onnx.data").resolve())]
        np.testing.assert_allclose(_run(source), expected, rtol=1e-5, atol=1e-5)
    assert _hidden(tmp_path) == []


def test_a_second_in_place_fold_never_writes_over_the_kept_data_file(run_cli, tmp_path: Path) -> None:
    """Defect 3, continued: alternating between two names would have replaced the kept file on the next run."""
    source = _external(tmp_path, "a.onnx")
    data = (tmp_path / "a.onnx.data").read_bytes()
    shutil.copy(source, tmp_path / "b.onnx")
    expected = _run(tmp_path / "b.onnx")
    for _ in range(2):
        result = run_cli("fold", source, "--in-place", "--no-verify")
        assert result.code == ExitCode.OK, result.stderr
    assert (tmp_path / "a.onnx.data").read_bytes() == data
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "a.onnx",
        "a.onnx.1.data",
        "a.onnx.2.data",
        "a.onnx.data",
        "b.onnx",
    ]
    np.testing.assert_array_equal(_run(tmp_path / "b.onnx"), expected)
    np.testing.assert_allclose(_run(source), expected, rtol=1e-5, atol=1e-5)


def test_in_place_with_only_small_tensors_writes_no_empty_data_file(run_cli, tmp_path: Path) -> None:
    """Since old data files are kept, an empty new one per run would pile up: small tensors need no data file."""
    model, data = with_external_data(conv_bn_model(), "a.onnx.data")  # (every folded tensor under 1 KiB)
    (tmp_path / "a.onnx.data").write_bytes(data)
    source = write_model(tmp_path / "a.onnx", model)
    result = run_cli("fold", source, "--in-place", "--no-verify")
    assert result.code == ExitCode.OK, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data"]
    assert (tmp_path / "a.onnx.data").read_bytes() == data
    written = onnx.load(source)
    assert all(tensor.data_location == onnx.TensorProto.DEFAULT for tensor in written.graph.initializer)
    onnx.checker.check_model(written, full_check=True)


# --- 7: two writers of one output -------------------------------------------------------------------------------

# Each process folds its own model into out.onnx; os.replace is hooked so that, unserialised, A renames its data
# file, then B its data file and its model, then A its model: A's graph with B's data, and both exit 0.
_WRITER = """
import os, sys, time
from pathlib import Path
from bnfold.files import staging

tag, other, source = sys.argv[1:4]
marks = Path("marks")

def mark(name):
    (marks / f"{tag}.{name}").touch()

def seen(name, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (marks / f"{other}.{name}").exists():
            return True
        time.sleep(0.02)
    return False

real_commit = staging.StagedModel.commit

def commit(self):
    if tag == "B":  # let A take the commit first
        seen("ready", 60)
        time.sleep(0.3)
    mark("ready")
    return real_commit(self)

staging.StagedModel.commit = commit
real_replace = os.replace

def replace(source_path, target):
    if not Path(target).name.startswith("out.onnx"):
        return real_replace(source_path, target)
    is_data = os.fspath(target).endswith(".data")
    if tag == "A" and is_data:
        seen("ready", 60)
        real_replace(source_path, target)
        mark("data")
        seen("data", 2)  # unserialised, B renames its data file now
        return None
    if tag == "A":
        seen("model", 2)  # ... and its model
        return real_replace(source_path, target)
    if is_data:
        seen("data", 20)
    real_replace(source_path, target)
    mark("data" if is_data else "model")
    return None

os.replace = replace
from bnfold.cli import main
sys.exit(main(["fold", source, "-o", "out.onnx", "--no-verify", "-q"]))
"""


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(os.fspath(path))  # (external data loaded from beside it)
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def test_two_processes_writing_one_output_never_mix_model_and_data(tmp_path: Path) -> None:
    """Defect 7: concurrent commits of one ``-o`` interleaved their renames (data, data, model, model)."""
    from bnfold import api

    (tmp_path / "marks").mkdir()
    sources = {
        "A": _external(tmp_path, "a.onnx", graph_name="A"),
        "B": _external(tmp_path, "b.onnx", scale=2.0, graph_name="B"),
    }
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, tag, other, str(sources[tag])],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag, other in (("A", "B"), ("B", "A"))
    ]
    try:
        results = [process.communicate(timeout=180) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], results
    written = onnx.load(os.fspath(tmp_path / "out.onnx"), load_external_data=False)
    folded, _ = api.fold(os.fspath(sources[written.graph.name]))
    expected = {name: value.const_value.numpy() for name, value in folded.graph.initializers.items()}
    actual = _initializers(tmp_path / "out.onnx")
    assert set(actual) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(actual[name], array, err_msg=f"{name}: the data file of the other writer")
    onnx.checker.check_model(os.fspath(tmp_path / "out.onnx"), full_check=True)
    assert _hidden(tmp_path) == []  # no staging folder, no lock file left


def test_the_output_lock_is_exclusive_and_leaves_no_file(tmp_path: Path) -> None:
    """The lock behind defect 7's fix: a second holder waits; the lock file is gone afterwards."""
    from bnfold.files.staging import lock_path, output_lock

    destination = tmp_path / "out.onnx"
    script = textwrap.dedent(
        f"""
        from bnfold.files.staging import output_lock
        print("waiting", flush=True)
        with output_lock({str(destination)!r}):
            print("locked", flush=True)
        """
    )
    with output_lock(destination):
        assert lock_path(destination).is_file()
        waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        try:
            assert waiter.stdout.readline().strip() == "waiting"
            time.sleep(1.5)
            assert waiter.poll() is None  # still waiting for the lock this process holds
        except BaseException:
            waiter.kill()
            raise
    output, _ = waiter.communicate(timeout=60)
    assert output.strip() == "locked" and waiter.returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_file_is_taken_over_and_a_planted_link_refused(run_cli, tmp_path: Path) -> None:
    """A lock file left by a killed process is reused and removed; a symlink in its place is never followed."""
    write_model(tmp_path / "model.onnx", conv_bn_model())
    (tmp_path / ".out.onnx.bnfold-lock").touch()
    result = run_cli("fold", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--no-verify")
    assert result.code == ExitCode.OK, result.stderr
    assert _hidden(tmp_path) == []
    target = tmp_path.parent / f"{tmp_path.name}-target"
    (tmp_path / ".again.onnx.bnfold-lock").symlink_to(target)
    result = run_cli("fold", tmp_path / "model.onnx", "-o", tmp_path / "again.onnx", "--no-verify")
    assert result.code == ExitCode.WRITE_FAILED, result.stderr
    assert not target.exists() and not (tmp_path / "again.onnx").exists()
    assert _hidden(tmp_path) == [".again.onnx.bnfold-lock"]  # (the link itself; no staging folder)


# --- recalibrate --fold with a failed verification ---------------------------------------------------------------


def test_recalibrate_fold_writes_nothing_when_verification_fails(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``recalibrate --fold`` wrote the folded model although its verification failed (exit 1 only)."""
    from bnfold import api

    real_fold = api.fold

    def wrong_fold(model, **kwargs):  # a fold that breaks the model, as a bug would
        folded, report = real_fold(model, **kwargs)
        weight = folded.graph.initializers["W"]
        weight.const_value = ir.Tensor(weight.const_value.numpy() * np.float32(1.5), name="W")
        return folded, report

    monkeypatch.setattr(api, "fold", wrong_fold)
    write_model(tmp_path / "model.onnx", _wide_conv_bn())
    np.savez(tmp_path / "cal.npz", X=GOOD_X)
    before = snapshot(tmp_path)
    result = run_cli("recalibrate", tmp_path / "model.onnx", "--data", tmp_path / "cal.npz", "-o", tmp_path / "o.onnx",
                     "--fold")  # fmt: skip
    assert result.code == ExitCode.FAILED, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "verification failed" in lines[0] and "nothing was written" in lines[0], lines
    assert snapshot(tmp_path) == before  # no o.onnx, no staging folder


def test_recalibrate_fold_still_writes_when_verification_passes(run_cli, tmp_path: Path) -> None:
    write_model(tmp_path / "model.onnx", _wide_conv_bn())
    np.savez(tmp_path / "cal.npz", X=GOOD_X)
    result = run_cli("recalibrate", tmp_path / "model.onnx", "--data", tmp_path / "cal.npz", "-o", tmp_path / "o.onnx",
                     "--fold")  # fmt: skip
    assert result.code == ExitCode.OK, result.stderr
    written = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert [node.op_type for node in written.graph.node] == ["Conv"]


# --- SIGTERM to a batch's process group ------------------------------------------------------------------------

# Loaded by every interpreter of the batch (parent, forkserver, workers): a worker stops after writing its staged
# model, so that the signal arrives while the hidden staging folder exists.
_SITECUSTOMIZE = """
import os, time
from pathlib import Path

marks = os.environ.get("BNFOLD_TEST_MARKS")
if marks:
    from bnfold.files import serialize

    real = serialize.write_model

    def write_then_wait(model, path, *args, **kwargs):
        result = real(model, path, *args, **kwargs)
        Path(marks, f"{os.getpid()}.staged").touch()
        time.sleep(120)
        return result

    serialize.write_model = write_then_wait
"""


def test_sigterm_to_a_batch_process_group_leaves_no_staging_folder(tmp_path: Path) -> None:
    """Batch workers kept the default SIGTERM action: killed outright, they left their hidden staging folders."""
    hooks, marks, work = tmp_path / "hooks", tmp_path / "marks", tmp_path / "work"
    for directory in (hooks, marks, work, work / "out"):
        directory.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        write_model(work / name, conv_bn_model())
    before = snapshot(work)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO_ROOT)]),
        "BNFOLD_TEST_MARKS": str(marks),
    }
    argv = [sys.executable, "-m", "bnfold", "fold", "a.onnx", "b.onnx", "c.onnx", "out/", "-j", "2", "--no-verify"]
    process = subprocess.Popen(
        argv, cwd=work, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert len(list(marks.iterdir())) == 2, process.communicate(timeout=60)
        assert any(path.name.startswith(".") for path in (work / "out").iterdir())  # the staging folders exist
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "bnfold: terminated", stderr
    assert "Traceback" not in stderr, stderr
    assert snapshot(work) == before  # no output, no hidden staging folder


# --- a model file swapped for a FIFO after its check -----------------------------------------------------------


@pytest.mark.parametrize("loader", ["load_model", "open_lazily"])
def test_a_model_swapped_for_a_fifo_after_its_check_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str
) -> None:
    """The model path was checked (``is_file``) and then opened by name: a FIFO swapped in between blocked."""
    from bnfold.files import inputs, load

    path = write_model(tmp_path / "model.onnx", _wide_conv_bn())
    real_check = inputs.require_regular_file

    def check_then_swap(target, flag, **kwargs):
        real_check(target, flag, **kwargs)
        if Path(target) == path and not path.is_fifo():
            path.unlink()
            os.mkfifo(path)

    monkeypatch.setattr(inputs, "require_regular_file", check_then_swap)
    with pytest.raises(InvalidModelError, match="a FIFO, not a regular file"):
        getattr(load, loader)(path)
    assert path.is_fifo()
