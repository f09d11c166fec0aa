"""Atomic writes: a model is written under a hidden temporary directory beside its destination, then renamed.

A reader never sees a half-written model and a crash leaves the previous state: :func:`stage_model` writes
every file under ``.<name>.XXXX/`` in the destination's directory; :meth:`StagedModel.commit` renames the data
file, then the model, into place. Staged files can be used (verified) before they replace anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from bnfold.errors import UsageError, WriteFailedError, one_line
from bnfold.files import serialize
from bnfold.files.load import estimated_size_bytes, external_files, has_external_data
from bnfold.files.paths import external_data_name
from bnfold.files.serialize import PROTOBUF_LIMIT_BYTES
from bnfold.files.writer import DataFile


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    with stage_model(model, path, external_data=external_data) as staged:
        staged.commit()


def stage_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """Write ``model`` under a temporary directory beside ``path``; :meth:`StagedModel.commit` moves it in.

    ``external_data=None`` chooses: external data when the model already had external tensors or its
    tensors exceed the 2 GiB protobuf limit (file names: :func:`create_staging`). Tensors already on disk are
    copied byte for byte, never decoded; a self-contained model is streamed, never built as one protobuf
    (:mod:`bnfold.files.serialize`). The staged files can be used (verified, for instance) before they replace
    anything at ``path``. ``model`` is unchanged.
    """
    staged = create_staging(model, path, external_data=external_data)
    try:
        with writing(path):
            if staged.data_name is None:
                serialize.write_model(model, staged.path)
            else:
                data = DataFile(staged.data_path)
                try:
                    serialize.write_model(model, staged.path, data)
                finally:
                    data.close()
    except BaseException:
        staged.discard()
        raise
    return staged


def create_staging(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    read_files: set[Path] | None = None,
) -> StagedModel:
    """An empty temporary directory beside ``path`` and the names ``model`` is to be written under there.

    The data file is ``<file name>.data``, or ``<file name>.<n>.data`` with the smallest ``n >= 1`` when that
    name is a file ``model`` still reads external data from (folding in place alternates between the two), so
    the output never replaces a data file the input reads. ``read_files``: those files (resolved paths), when
    the caller knows them (default: :func:`external_files`).
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or estimated_size_bytes(model) >= PROTOBUF_LIMIT_BYTES
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    read = external_files(model) if read_files is None else read_files
    data_name = superseded = None
    if external_data:
        data_name = _data_name_not_in(path, read)
        superseded = tuple(
            file for file in read if file.parent == path.parent.resolve() and _is_data_name_for(path, file.name)
        )
    with writing(path):
        staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory)
    return StagedModel(staging, path, data_name, superseded=superseded or ())


def _is_data_name_for(path: Path, name: str) -> bool:
    if name == external_data_name(path):
        return True
    prefix, suffix = path.name + ".", ".data"
    middle = name[len(prefix) : -len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
    return middle.isdigit()


def _data_name_not_in(path: Path, taken: set[Path]) -> str:
    directory = path.parent.resolve()
    candidates = [external_data_name(path)] + [f"{path.name}.{n}.data" for n in range(1, len(taken) + 2)]
    return next(name for name in candidates if Path(os.path.realpath(directory / name)) not in taken)


class StagedModel:
    """A model written under a temporary directory, not yet visible at its destination.

    Use as a context manager: leaving the block without :meth:`commit` removes the staged files.
    ``superseded_data`` lists the data files, named for this destination, that the written model's source
    read and the new model no longer does (after an in-place fold: the previous data file).
    """

    def __init__(
        self,
        staging: tempfile.TemporaryDirectory,
        destination: Path,
        data_name: str | None,
        *,
        superseded: tuple[Path, ...] = (),
    ) -> None:
        self._staging = staging
        self.destination = destination
        self.data_name = data_name
        self.path = Path(staging.name) / destination.name
        self.superseded_data = tuple(file for file in superseded if file.name != data_name)

    @property
    def data_path(self) -> Path | None:
        """The staged data file (``None`` for a self-contained model)."""
        return self.path.parent / self.data_name if self.data_name is not None else None

    def size_bytes(self) -> int:
        """Bytes of the staged model and data file (before :meth:`commit`)."""
        data = self.data_path
        return self.path.stat().st_size + (data.stat().st_size if data is not None and data.is_file() else 0)

    def commit(self) -> None:
        """Rename the data file (if any), then the model into place; the model goes last.

        When the destination (or the data file name) already exists, the new files are fsynced first, so a
        crash cannot replace existing files by partly written ones. A new destination is renamed without
        fsync, like ``cp`` writes: the input stays intact whatever happens.
        """
        directory = self.destination.parent
        replacing = self.destination.exists() or (self.data_name is not None and (directory / self.data_name).exists())
        with writing(self.destination):
            if self.data_name is not None:
                if replacing:
                    _fsync(self.data_path)
                os.replace(self.data_path, directory / self.data_name)
            if replacing:
                _fsync(self.path)
            os.replace(self.path, self.destination)
        if replacing:
            _fsync_directory(directory)
        self.discard()

    def remove_superseded_data(self) -> tuple[Path, ...]:
        """After an in-place :meth:`commit`, delete :attr:`superseded_data`; return what was removed."""
        removed = []
        for file in self.superseded_data:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                removed.append(file)
        return tuple(removed)

    def discard(self) -> None:
        self._staging.cleanup()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


@contextlib.contextmanager
def writing(destination: str | os.PathLike) -> Iterator[None]:
    """Report an ``OSError`` raised while writing ``destination`` (disk full, read-only file system, permission)
    as :class:`~bnfold.errors.WriteFailedError` (exit 6) naming ``destination``, not the hidden staging file."""
    try:
        yield
    except OSError as error:
        raise WriteFailedError(f"{destination}: cannot write ({error.strerror or one_line(error)})") from error


def _fsync(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
