"""Input data files (``--data``, ``--load-inputs``): regular files only, ``.npz`` checked before it is inflated.

What every reader here guarantees (docs/safety.md, "Input data"):

- **Regular files only.** A path is checked with ``stat`` before it is opened and again, with ``fstat``, on the
  opened descriptor (opened with ``O_NONBLOCK``, so that a FIFO swapped in between cannot block): a FIFO,
  socket, device or directory is refused with one :class:`~bnfold.errors.UsageError` line, never read.
- **Headers before data.** An ``.npz`` is a zip archive of ``.npy`` members. Every member's ``.npy`` header
  (dtype, shape) is read first, through :mod:`zipfile`, and checked — object (pickled) dtypes refused, the
  caller's ``check`` (the model's input names, types and fixed dims), and the declared bytes of all members
  together at most :data:`MAX_NPZ_BYTES` — before any array data is inflated. A member then yields exactly the
  bytes its header declares, so a small archive that inflates to gigabytes costs nothing.
- **Native byte order.** Big-endian arrays are converted to the machine's byte order (onnxruntime takes the
  bytes as they are: unconverted they are silently wrong numbers).
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from bnfold.errors import BnfoldError, UsageError, one_line

# The declared array bytes one ``.npz`` file may hold, all members together (2 GiB): more is refused unread.
MAX_NPZ_BYTES = 2**31
# What a zip archive starts with: a local file header, or the end record of an empty archive.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# The longest ``.npy`` header accepted (numpy's own default limit).
MAX_NPY_HEADER_BYTES = 10_000

# An array as its ``.npy`` header declares it: (shape, dtype).
Declared = tuple[tuple[int, ...], np.dtype]
# check({key: declared}): raise UsageError when the members do not fit; called before any data is read.
MembersCheck = Callable[[dict[str, Declared]], None]


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as an error message shows it: as is when printable, else quoted with escapes (one line)."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return text if text.isprintable() else repr(text)


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _where(path: str | os.PathLike, flag: str) -> str:
    return f"{flag} {shown_path(path)}" if flag else shown_path(path)


def require_regular_file(path: str | os.PathLike, flag: str, *, error: type[BnfoldError] = UsageError) -> None:
    """Raise ``error`` (naming ``flag`` and ``path``) unless ``path`` is an existing regular file."""
    where = _where(path, flag)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as failure:
        raise error(f"{where}: no such file") from failure
    except (OSError, ValueError) as failure:
        raise error(f"{where}: cannot read ({_reason(failure)})") from failure
    if not stat.S_ISREG(mode):
        raise error(f"{where}: {_kind(mode)}, not a regular file")


def open_regular_file(path: str | os.PathLike, flag: str, *, error: type[BnfoldError] = UsageError) -> BinaryIO:
    """Open ``path`` for binary reading; ``error`` (default :class:`UsageError`; model files:
    :class:`~bnfold.errors.InvalidModelError`) unless it is a regular file (see the module docstring)."""
    require_regular_file(path, flag, error=error)
    where = _where(path, flag)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as failure:
        raise error(f"{where}: cannot read ({_reason(failure)})") from failure
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):  # replaced between the two checks
            raise error(f"{where}: {_kind(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_npz(
    path: str | os.PathLike,
    flag: str,
    check: MembersCheck | None = None,
    *,
    max_bytes: int = MAX_NPZ_BYTES,
) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` by key (member name without ``.npy``), in native byte order.

    Raises :class:`UsageError`, one line naming ``flag`` and ``path``: not a regular file, empty, not a zip
    archive, a member that is not a ``.npy`` array, an object (pickle) dtype, ``check`` refusing the members,
    more than ``max_bytes`` declared, or data that cannot be read. Pickles are never loaded.
    """
    where = _where(path, flag)
    with open_regular_file(path, flag) as handle:
        magic = handle.read(4)
        if not magic:
            raise UsageError(f"{where}: not a readable .npz file (the file is empty)")
        if magic not in ZIP_MAGICS:
            raise UsageError(f"{where}: not a readable .npz file (no zip archive header)")
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                members = _member_headers(archive, where)
                if check is not None:
                    check({key: (shape, dtype) for key, (_, shape, dtype, _) in members.items()})
                declared = sum(nbytes for _, _, _, nbytes in members.values())
                if declared > max_bytes:
                    raise UsageError(
                        f"{where}: the arrays declare {declared} bytes, more than the {max_bytes} bytes accepted "
                        "per file; split the data into several files"
                    )
                return {key: _read_member(archive, info) for key, (info, _, _, _) in members.items()}
        except UsageError:
            raise
        except MemoryError as error:
            raise UsageError(f"{where}: not enough memory to read the arrays") from error
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
            raise UsageError(f"{where}: not a readable .npz file ({_reason(e)})") from e


def _member_headers(
    archive: zipfile.ZipFile, where: str
) -> dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype, int]]:
    """key → (zip entry, shape, dtype, declared bytes) of every member, from the ``.npy`` headers alone."""
    members: dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype, int]] = {}
    for info in archive.infolist():
        if info.is_dir():
            continue
        key = info.filename.removesuffix(".npy")
        if key == info.filename:
            raise UsageError(f"{where}: not a readable .npz file (member {info.filename!r} is not an .npy array)")
        if key in members:
            raise UsageError(f"{where}: not a readable .npz file (member {info.filename!r} appears twice)")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
            else:
                raise UsageError(
                    f"{where}: not a readable .npz file (member {info.filename!r}: .npy format {version} unsupported)"
                )
        if dtype.hasobject:
            raise UsageError(
                f"{where}: not a readable .npz file (array {key!r} holds Python objects; pickles are refused)"
            )
        if any(size < 0 for size in shape):
            raise UsageError(f"{where}: not a readable .npz file (array {key!r} declares the shape {list(shape)})")
        members[key] = (info, tuple(shape), dtype, math.prod(shape) * dtype.itemsize)
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member's array (reads only the bytes its header declares), converted to native byte order."""
    with archive.open(info) as member:
        array = np.lib.format.read_array(member, allow_pickle=False, max_header_size=MAX_NPY_HEADER_BYTES)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return one_line(error)
