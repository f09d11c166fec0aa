"""Atomic writes: a model is written under a hidden temporary directory beside its destination, then renamed.

A reader never sees a half-written model and a crash leaves the previous state: :func:`stage_model` writes
every file under ``.<name>.XXXX/`` in the destination's directory; :meth:`StagedModel.commit` renames the data
file, then the model, into place, under an advisory lock per destination (:func:`output_lock`), so concurrent
bnfold processes never pair one's model with another's data file. Staged files can be used (verified) before
they replace anything. Nothing here deletes a file it did not write: writing in place, the input's old data files
are kept (:attr:`StagedModel.kept_data`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from bnfold.errors import UsageError, WriteFailedError, one_line
from bnfold.files import serialize
from bnfold.files.load import SOURCE_EXTERNAL_META, estimated_size_bytes, external_files, has_external_data
from bnfold.files.paths import external_data_name
from bnfold.files.serialize import PROTOBUF_LIMIT_BYTES
from bnfold.files.writer import DataFile

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: commits are not serialised
    fcntl = None  # type: ignore[assignment]


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    with stage_model(model, path, external_data=external_data) as staged:
        staged.commit()


def stage_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """Write ``model`` under a temporary directory beside ``path``; :meth:`StagedModel.commit` moves it in.

    ``external_data=None`` chooses: external data when the model has external tensors, was loaded from a file
    with external data (even when folding replaced every external tensor since) or its tensors exceed the 2 GiB
    protobuf limit (file names: :func:`create_staging`). Tensors already on disk are
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
                if data.stored == 0:
                    staged.drop_data()
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
    name is a file ``model`` still reads external data from (folding in place alternates between names), so
    the output never replaces a data file the input reads. ``read_files``: those files (resolved paths), when
    the caller knows them (default: :func:`external_files`).

    Writing in place (``path`` is a file ``model`` was read from), a name that exists is skipped too, and the
    data files the input read are listed in :attr:`StagedModel.kept_data`: they are never deleted nor written
    into, since a copy of the model (``cp a.onnx b.onnx``) may still read them, and bnfold cannot know.
    """
    path = Path(path)
    if external_data is None:
        external_data = (
            has_external_data(model)
            or bool(model.meta.get(SOURCE_EXTERNAL_META))  # (folding may have replaced every external tensor)
            or estimated_size_bytes(model) >= PROTOBUF_LIMIT_BYTES
        )
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    read = external_files(model) if read_files is None else read_files
    itself = Path(os.path.realpath(path))
    in_place = itself in read
    data_name = _data_name_not_in(path, read, skip_existing=in_place) if external_data else None
    kept = tuple(sorted(file for file in read if file != itself)) if in_place else ()
    with writing(path):
        staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory)
    return StagedModel(staging, path, data_name, kept=kept)


def _data_name_not_in(path: Path, taken: set[Path], *, skip_existing: bool = False) -> str:
    """The first of ``<name>.data``, ``<name>.1.data``, ... that is not in ``taken`` (and, with ``skip_existing``,
    names no existing file or link)."""
    directory = path.parent.resolve()
    for number in itertools.count():
        name = external_data_name(path) if number == 0 else f"{path.name}.{number}.data"
        candidate = directory / name
        if Path(os.path.realpath(candidate)) in taken:
            continue
        if skip_existing and (candidate.exists() or candidate.is_symlink()):
            continue
        return name
    raise AssertionError("unreachable")


class StagedModel:
    """A model written under a temporary directory, not yet visible at its destination.

    Use as a context manager: leaving the block without :meth:`commit` removes the staged files.
    ``kept_data`` lists, for an in-place write, the data files the input read and the new model no longer
    reads: bnfold leaves them as they are (a copy of the model may read them) and its callers say so.
    """

    def __init__(
        self,
        staging: tempfile.TemporaryDirectory,
        destination: Path,
        data_name: str | None,
        *,
        kept: tuple[Path, ...] = (),
    ) -> None:
        self._staging = staging
        self.destination = destination
        self.data_name = data_name
        self.path = Path(staging.name) / destination.name
        self.kept_data = kept

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
        fsync, like ``cp`` writes: the input stays intact whatever happens. The two renames happen under
        :func:`output_lock`, so two processes writing the same output cannot pair one's model with the other's
        data file: the last commit wins whole.
        """
        directory = self.destination.parent
        with writing(self.destination), output_lock(self.destination):
            replacing = self.destination.exists() or (
                self.data_name is not None and (directory / self.data_name).exists()
            )
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

    def drop_data(self) -> None:
        """Forget the staged data file: nothing was stored in it (every tensor is small), so none is written."""
        if self.data_path is not None:
            self.data_path.unlink(missing_ok=True)
        self.data_name = None

    def discard(self) -> None:
        self._staging.cleanup()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def lock_path(destination: str | os.PathLike) -> Path:
    """The advisory lock file of ``destination``: ``.<file name>.bnfold-lock`` beside it."""
    destination = Path(destination)
    return destination.with_name(f".{destination.name}.bnfold-lock")


@contextlib.contextmanager
def output_lock(destination: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) for ``destination`` while the block runs.

    Every bnfold process commits an output under this lock, so commits of one output never interleave. The lock
    file (:func:`lock_path`) is removed while still locked; a waiter that then obtains the lock on the removed
    file sees that the path no longer names it and locks afresh, so nothing is left behind and no two holders
    coexist. A process killed outright leaves an empty lock file, which the next commit locks and removes. Where
    ``flock`` is unavailable (not POSIX, a file system without locks) the commit runs unlocked, as it always
    did. Only bnfold processes take the lock: another program writing the same files is not held back.
    """
    path = lock_path(destination)
    descriptor = _locked(path)
    try:
        yield
    finally:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(descriptor)  # (closing releases the lock)


def _locked(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive ``flock``; ``None`` where locking is not available."""
    if fcntl is None:
        return None
    while True:
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        descriptor = os.open(path, flags, 0o644)  # (a planted symlink fails: ELOOP; a FIFO does not block)
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(errno.EEXIST, f"{path.name} exists and is not a regular file", os.fspath(path))
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _same_inode(os.fstat(descriptor), path):
                return descriptor
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # the holder removed it after we opened it: lock the new one


def _same_inode(opened: os.stat_result, path: Path) -> bool:
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


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
