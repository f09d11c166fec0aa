"""Helpers of the security suite: CLI runners, directory snapshots, external-data model builders.

The fuzzer package (``fuzz/`` at the repository root) supplies the seed models, so the repository root is put
on ``sys.path`` here (``conftest.py`` imports this module first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fuzz import seeds  # noqa: E402  (needs the path above)


@dataclasses.dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_subprocess(*argv: object, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run ``python -m bnfold ARGV`` in a fresh interpreter."""
    environment = {**os.environ, **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-m", "bnfold", *(str(arg) for arg in argv)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or REPO_ROOT,
        timeout=120,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under ``directory`` (hidden ones included): file digest, link target, or 'dir'."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            entries[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[name] = "dir"
        else:
            entries[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def write_model(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def conv_bn_model() -> onnx.ModelProto:
    """The fuzzer's ``conv_bn`` seed: ``X[1,4,5,5] → Conv → BN → Y`` (one foldable BN)."""
    return seeds.conv_bn()


def with_external_data(model: onnx.ModelProto, location: str, *, threshold: int = 16) -> tuple[onnx.ModelProto, bytes]:
    """Move every initializer of ``threshold``+ bytes to ``location`` (returned as bytes, not written)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    data = bytearray()
    for tensor in model.graph.initializer:
        raw = numpy_helper.to_array(tensor).tobytes()
        if len(raw) < threshold:
            continue
        offset = len(data)
        data += raw
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model, bytes(data)


def set_external_entry(model: onnx.ModelProto, tensor_name: str, key: str, value: str) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value


def value_info(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
