"""Calibration data: ``.npz`` files holding one batch each, keyed by input name, read one at a time.

A path is an ``.npz`` file (one batch) or a directory whose ``*.npz`` files (sorted by name) are the batches.
Files are opened lazily on every pass, so memory holds one batch at a time however many files there are.
bfloat16 inputs may be stored as their uint16 bit patterns (numpy cannot store bfloat16).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bnfold.errors import UsageError


class NpzBatches:
    """Re-iterable batches read from ``.npz`` files; ``len()`` is the number of files."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            files = sorted(file for file in path.glob("*.npz") if file.is_file())
            if not files:
                raise UsageError(f"--data {path}: the directory holds no .npz file")
        elif path.is_file():
            files = [path]
        else:
            raise UsageError(f"--data {path}: no such file or directory")
        self.files = tuple(files)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            yield read_batch(file)


def read_batch(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file; UsageError for an unreadable file, pickled arrays or no arrays."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            batch = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UsageError(f"--data {path}: not a readable .npz file ({reason})") from error
    if not batch:
        raise UsageError(f"--data {path}: the file holds no arrays")
    return batch
