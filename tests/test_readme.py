"""The README's Python API block runs verbatim (on the bundled demo model, copied as ``model.onnx``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_python_api_block_runs_verbatim(tmp_path: Path) -> None:
    shutil.copy(ROOT / "models" / "demo_resnet.onnx", tmp_path / "model.onnx")
    script = tmp_path / "api.py"
    script.write_text(python_block("## Python API"))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model.folded.onnx").is_file()
