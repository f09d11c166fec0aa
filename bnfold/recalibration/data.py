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
        elif path.exists():
            raise UsageError(f"--data {path}: not a regular file or directory")
        else:
            raise UsageError(f"--data {path}: no such file or directory")
        self.files = tuple(files)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            yield read_batch(file)


# What ``np.load`` takes for an ``.npz`` (zip) archive: a local file header, or the end record of an empty zip.
# Anything else it would read as ``.npy`` (an array, not a batch) or pickle (refused, never unpickled).
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def read_batch(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file; UsageError for an unreadable file, pickled arrays or no arrays.

    Pickles are never loaded (``allow_pickle=False``); a file that is not a zip archive (``.npy``, pickle,
    empty, random bytes) is refused before numpy looks at it; so are an array whose header declares more memory
    than can be allocated, and members that are encrypted or use a compression method zipfile lacks.
    """
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise UsageError(f"--data {path}: cannot read ({error.strerror or error})") from error
    if magic not in ZIP_MAGICS:
        raise UsageError(f"--data {path}: not a readable .npz file (no zip archive header)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            batch = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, MemoryError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UsageError(f"--data {path}: not a readable .npz file ({reason})") from error
    if not batch:
        raise UsageError(f"--data {path}: the file holds no arrays")
    return batch
