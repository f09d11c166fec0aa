"""Packaging: each install recipe brings exactly one onnxruntime, and bnfold without one says what to install.

``onnxruntime`` and ``onnxruntime-gpu`` provide the same Python module; installed together, the last one wins and
CUDA silently disappears. So the base install has no runtime and each extra brings exactly one. The resolution
tests ask pip what it *would* install (``--dry-run --report``, nothing is installed) from the package registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bnfold.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("onnxruntime", "onnxruntime-gpu")
DEMO = ROOT / "models" / "demo_resnet.onnx"


def _resolve(requirement: str, tmp_path: Path) -> list[str]:
    """The distribution names pip would install for ``requirement`` into an empty environment."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    command += ["--report", str(report), requirement]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "Could not find a version" in done.stderr:
        pytest.skip(f"the package registry cannot be reached: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]


@pytest.mark.parametrize(
    ("extra", "runtime"),
    [("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu"), ("onnxruntime", "onnxruntime"), ("test", "onnxruntime")],
)
def test_each_extra_resolves_exactly_one_runtime(extra: str, runtime: str, tmp_path: Path) -> None:
    names = _resolve(f"{ROOT}[{extra}]", tmp_path)
    assert [name for name in names if name in RUNTIMES] == [runtime]


def test_base_install_brings_no_runtime(tmp_path: Path) -> None:
    names = _resolve(str(ROOT), tmp_path)
    assert "bnfold" in names
    assert not [name for name in names if name.startswith("onnxruntime")]


def _run_without_onnxruntime(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bnfold ARGS`` in a process where ``import onnxruntime`` fails, as after a base install."""
    script = "import sys; sys.modules['onnxruntime'] = None\nfrom bnfold.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "command",
    [
        ["fold", str(DEMO), "-o", "out.onnx"],
        [str(DEMO), "-o", "out.onnx"],
        ["verify", str(DEMO), str(DEMO)],
        ["recalibrate", str(DEMO), "--data", "missing.npz", "-o", "out.onnx"],
        ["doctor"],
    ],
    ids=["fold", "default-command", "verify", "recalibrate", "doctor"],
)
def test_commands_needing_a_runtime_say_what_to_install(command: list[str], tmp_path: Path) -> None:
    done = _run_without_onnxruntime(*command, cwd=tmp_path)
    assert done.returncode == ExitCode.RUNTIME_MISSING, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs onnxruntime, which is not installed" in lines[0]
    assert 'pip install "bnfold[cpu]"' in lines[0] and '"bnfold[gpu]"' in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_fold_without_verification_needs_no_runtime(tmp_path: Path) -> None:
    done = _run_without_onnxruntime("fold", str(DEMO), "-o", "out.onnx", "--no-verify", cwd=tmp_path)
    assert done.returncode == ExitCode.OK, done.stderr
    assert (tmp_path / "out.onnx").is_file()


def test_check_needs_no_runtime(tmp_path: Path) -> None:
    done = _run_without_onnxruntime("check", str(DEMO), cwd=tmp_path)
    assert done.returncode == ExitCode.FAILED, done.stderr  # the demo model has foldable BNs
    assert "onnxruntime" not in done.stderr
