"""Calibration data: ``.npz`` files holding one batch each, keyed by input name, read one at a time.

A path is an ``.npz`` file (one batch) or a directory whose ``*.npz`` regular files (sorted by name) are the
batches. Files are opened lazily on every pass, so memory holds one batch at a time however many files there are.
bfloat16 inputs may be stored as their uint16 bit patterns (numpy cannot store bfloat16).

Every file is read by :func:`bnfold.files.inputs.read_npz`: regular files only, pickles refused, big-endian
arrays converted to native byte order, and — once :meth:`NpzBatches.expect` knows the model's inputs — every
member's header (name, dtype, rank, fixed dims) checked against them before any array data is inflated.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from bnfold.errors import UsageError
from bnfold.files.inputs import Declared, read_npz, shown_path

FLAG = "--data"


class InputLike(Protocol):
    """What :meth:`NpzBatches.expect` needs of a model input (``bnfold.validate.inputs.InputSpec`` has it)."""

    name: str
    dtype: str  # numpy dtype name ("float32", "bfloat16", ...)
    dims: tuple[int | str | None, ...] | None


class NpzBatches:
    """Re-iterable batches read from ``.npz`` files; ``len()`` is the number of files."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        where = f"{FLAG} {shown_path(path)}"
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as error:
            raise UsageError(f"{where}: no such file or directory") from error
        except (OSError, ValueError) as error:
            raise UsageError(f"{where}: cannot read ({getattr(error, 'strerror', None) or error})") from error
        if stat.S_ISDIR(mode):
            files = sorted(file for file in path.glob("*.npz") if file.is_file())
            if not files:
                raise UsageError(f"{where}: the directory holds no .npz file")
        elif stat.S_ISREG(mode):
            files = [path]
        else:
            raise UsageError(f"{where}: not a regular file or directory")
        self.files = tuple(files)
        self.inputs: tuple[InputLike, ...] | None = None

    def expect(self, inputs: Sequence[InputLike]) -> None:
        """Check every file's members against ``inputs`` (names, dtypes, ranks, fixed dims) before reading them."""
        self.inputs = tuple(inputs)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            yield read_batch(file, self.inputs)


def read_batch(path: Path, inputs: Sequence[InputLike] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file; UsageError for an unreadable file, pickled arrays or no arrays.

    With ``inputs`` (the model's), a file whose keys are not exactly the input names, or whose member headers
    declare another dtype, rank or fixed dim than the model's, is refused before any data is read.
    """
    where = f"{FLAG} {shown_path(path)}"
    batch = read_npz(path, FLAG, None if inputs is None else lambda members: _check_members(where, inputs, members))
    if not batch:
        raise UsageError(f"{where}: the file holds no arrays")
    return batch


def _check_members(where: str, inputs: Sequence[InputLike], members: dict[str, Declared]) -> None:
    """Refuse members that are not exactly the model's inputs with their dtypes, ranks and fixed dims."""
    if not members:
        return  # read_batch names the empty file
    names = [spec.name for spec in inputs]
    missing = [name for name in names if name not in members]
    unknown = sorted(set(members) - set(names))
    if missing or unknown:
        parts = [f"missing input(s) {', '.join(missing)}"] if missing else []
        parts += [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
        raise UsageError(f"{where}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
    for spec in inputs:
        shape, dtype = members[spec.name]
        if not (dtype.name == spec.dtype or (spec.dtype == "bfloat16" and dtype.name == "uint16")):
            raise UsageError(f"{where}: input {spec.name!r} is {dtype.name}, the model takes {spec.dtype}")
        if spec.dims is None:
            continue
        if len(shape) != len(spec.dims):
            raise UsageError(
                f"{where}: input {spec.name!r} has rank {len(shape)}, the model takes rank {len(spec.dims)}"
            )
        for axis, (size, dim) in enumerate(zip(shape, spec.dims, strict=True)):
            if isinstance(dim, int) and size != dim:
                raise UsageError(f"{where}: input {spec.name!r} axis {axis} is {size}, the model fixes it to {dim}")
