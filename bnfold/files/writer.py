"""Writing model files fast and with bounded memory: a threaded writer at explicit offsets and the data file.

:class:`OutputFile` writes a new file from background threads, so writing overlaps the fold's math. A tensor
already on disk (an external reference into any file) is copied byte range to byte range
(``os.copy_file_range``, in the kernel) without being decoded; a deferred weight
(:class:`~bnfold.passes.casting.ScaledWeight`) is computed block by block by the writer threads into a reused
buffer and each block written at once, with direct I/O (``O_DIRECT``) where the file system allows, so a folded
weight never exists whole in memory nor passes through the page cache; an in-memory tensor is written straight
from its numpy buffer. :class:`DataFile` is an external-data file built this way, every tensor appended once.

Preconditions: a little-endian host (x86-64, arm64) for the zero-copy numpy path; elsewhere
``TensorProtocol.tobytes`` is used. Nothing here prints.
"""

from __future__ import annotations

import collections
import errno
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bnfold.errors import InvalidModelError
from bnfold.passes.casting import STREAM_BLOCK_BYTES, ScaledWeight

# Offsets of tensors larger than ALIGN_THRESHOLD_BYTES in a data file are multiples of ALIGNMENT_BYTES.
ALIGNMENT_BYTES = 4096
ALIGN_THRESHOLD_BYTES = 1024**2
_COPY_CHUNK_BYTES = 64 * 1024**2
# Bytes of folded tensors that may wait for the background writer (bounds the memory of the streaming fold).
IN_FLIGHT_BYTES = 64 * 1024**2
# Folded weights are written with direct I/O (``O_DIRECT``) where the file system supports it: multi-GiB outputs
# go to the disk at its speed instead of through the page cache (whose fills can be several times slower than the
# disk, and which they would evict). Offsets and blocks are aligned to DIRECT_IO_ALIGNMENT for it.
DIRECT_IO = True
DIRECT_IO_ALIGNMENT = 4096
# Threads that write the output file: one computes a deferred weight's next block while the other writes.
WRITER_THREADS = 2
LITTLE_ENDIAN = sys.byteorder == "little"


def raw_bytes(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's ``raw_data`` bytes, without a copy for contiguous little-endian numpy-backed tensors."""
    if LITTLE_ENDIAN and isinstance(tensor, ir.Tensor) and tensor.dtype.bitwidth >= 8:
        array = tensor.numpy()
        native = isinstance(array, np.ndarray) and array.dtype.byteorder != ">" and array.dtype.kind != "O"
        if native and array.dtype.itemsize == tensor.dtype.itemsize:
            return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return tensor.tobytes()


def append_tensor(output: OutputFile, tensor: ir.TensorProtocol) -> None:
    """Append the tensor's raw bytes: a byte-range copy, a deferred weight's blocks, or its buffer."""
    if is_on_disk(tensor):
        output.copy_range(tensor.path, tensor.offset or 0, tensor.nbytes)
    elif LITTLE_ENDIAN and isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, ScaledWeight):
        output.write_blocks(tensor.raw)
    else:
        output.write(raw_bytes(tensor))


def is_on_disk(tensor: ir.TensorProtocol) -> bool:
    return isinstance(tensor, ir.ExternalTensor)


class OutputFile:
    """A new file written at explicit offsets by background threads, so writing overlaps the fold's math.

    Offsets are reserved in the caller's thread (:attr:`position`); padding is left as a hole (reads as zeros).
    Jobs run on :data:`WRITER_THREADS` threads, so that one computes a deferred weight's next block
    (:meth:`write_blocks`) while the other writes one (one write at a time, see :meth:`_write_at`). At most
    :data:`IN_FLIGHT_BYTES` (or one larger buffer) wait to be written; the caller must not change a buffer
    after handing it over. Errors of a writer surface at the next call or at :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._direct = _open_direct(path)  # -1: no direct I/O here
        self.position = 0
        self._condition = threading.Condition()
        self._file_lock = threading.Lock()
        self._buffers = threading.local()
        self._jobs: collections.deque[tuple[Callable[[], None], int]] = collections.deque()
        self._in_flight = 0
        self._error: BaseException | None = None
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"bnfold-writer-{index}", daemon=True)
            for index in range(WRITER_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        offset = self._reserve(len(view))
        self._submit(functools.partial(self._write_at, view, offset), len(view))

    def write_blocks(self, weight: ScaledWeight) -> None:
        """Append ``weight``, computed and written block by block by a writer thread (no whole copy exists)."""
        offset = self._reserve(weight.nbytes)
        self._submit(functools.partial(self._write_blocks_at, weight, offset), weight.nbytes)

    def pad_to(self, offset: int) -> None:
        self.position = max(self.position, offset)

    def copy_range(self, source: str | os.PathLike, offset: int, length: int) -> None:
        """Append ``length`` bytes of ``source`` from ``offset``: in the kernel where the platform allows."""
        if os.path.getsize(source) < offset + length:
            raise InvalidModelError(f"{source}: external data ends before byte {offset + length}")
        destination = self._reserve(length)
        self._submit(functools.partial(self._copy_at, os.fspath(source), offset, length, destination), 0)

    def close(self) -> None:
        """Wait for every pending write, close the file, raise the first writer error if there was one."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        for descriptor in (self._descriptor, self._direct):
            if descriptor >= 0:
                os.close(descriptor)
        self._descriptor = self._direct = -1
        if self._error is not None:
            raise self._error

    def _reserve(self, length: int) -> int:
        offset = self.position
        self.position += length
        return offset

    def _submit(self, job: Callable[[], None], nbytes: int) -> None:
        with self._condition:
            while self._in_flight and self._in_flight + nbytes > IN_FLIGHT_BYTES and self._error is None:
                self._condition.wait()
            if self._error is not None:
                raise self._error
            self._jobs.append((job, nbytes))
            self._in_flight += nbytes
            self._condition.notify_all()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._closing and self._error is None:
                    self._condition.wait()
                if not self._jobs or self._error is not None:
                    return
                job, nbytes = self._jobs.popleft()
            try:
                job()
            except BaseException as error:  # handed to the caller's thread
                with self._condition:
                    self._error = self._error or error
                    self._jobs.clear()
                    self._in_flight = 0
                    self._condition.notify_all()
                return
            with self._condition:
                self._in_flight -= nbytes
                self._condition.notify_all()

    def _write_at(self, view: memoryview, offset: int) -> None:
        # One write at a time: the kernel serialises writes to a file anyway, and makes a waiting writer spin on
        # the inode lock (burning the CPU the other thread's arithmetic needs); this lock makes it sleep.
        with self._file_lock:
            while view:
                written = os.pwrite(self._descriptor, view, offset)
                view, offset = view[written:], offset + written

    def _write_blocks_at(self, weight: ScaledWeight, offset: int) -> None:
        """Compute ``weight`` block by block into this thread's buffer and write each block at ``offset`` on.

        Page-aligned blocks go through the direct-I/O descriptor (when there is one): straight to the disk,
        without copying them into the page cache; a last partial page is written through the page cache.
        """
        direct = self._direct >= 0 and offset % DIRECT_IO_ALIGNMENT == 0
        rows = weight.block_rows(DIRECT_IO_ALIGNMENT if direct else 1)
        row_bytes = weight.nbytes // max(weight.shape[0], 1)
        if direct and rows * row_bytes > 4 * STREAM_BLOCK_BYTES:  # rows of an odd size: aligned blocks too large
            direct, rows = False, weight.block_rows()
        buffer = self._block_buffer(rows * row_bytes)
        for block in weight.blocks(buffer, rows):
            view = memoryview(block.reshape(-1).view(np.uint8))
            aligned = len(view) - len(view) % DIRECT_IO_ALIGNMENT if direct else 0
            if aligned:
                self._write_direct(view[:aligned], offset)
            self._write_at(view[aligned:], offset + aligned)
            offset += len(view)

    def _block_buffer(self, nbytes: int) -> np.ndarray:
        """This thread's reusable block buffer of at least ``nbytes`` (page-aligned: anonymous memory map)."""
        buffer = getattr(self._buffers, "array", None)
        if buffer is None or buffer.nbytes < nbytes:
            self._buffers.array = buffer = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)
        return buffer

    def _write_direct(self, view: memoryview, offset: int) -> None:
        """Write page-aligned ``view`` at page-aligned ``offset`` with direct I/O; through the page cache where the
        file system refuses direct I/O (then for the rest of the file)."""
        with self._file_lock:
            while view and self._direct >= 0:
                try:
                    written = os.pwrite(self._direct, view, offset)
                except OSError as error:
                    if error.errno != errno.EINVAL:
                        raise
                    os.close(self._direct)
                    self._direct = -1
                    break
                view, offset = view[written:], offset + written
        if view:
            self._write_at(view, offset)

    def _copy_at(self, source: str, offset: int, length: int, destination: int) -> None:
        with open(source, "rb") as handle:
            with self._file_lock:
                copied = _kernel_copy(handle.fileno(), self._descriptor, offset, length, destination)
            while copied < length:
                chunk = os.pread(handle.fileno(), min(_COPY_CHUNK_BYTES, length - copied), offset + copied)
                if not chunk:
                    raise InvalidModelError(f"{source}: external data ends before byte {offset + length}")
                self._write_at(memoryview(chunk), destination + copied)
                copied += len(chunk)


def _open_direct(path: Path) -> int:
    """A second, write-only descriptor of ``path`` for direct I/O (``O_DIRECT``); -1 where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not DIRECT_IO or not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # tmpfs and some network file systems refuse it
        return -1


def _kernel_copy(source: int, destination: int, offset: int, length: int, destination_offset: int) -> int:
    """Copy with ``os.copy_file_range``; return the bytes copied (0 where the platform or file system refuses)."""
    copy_file_range = getattr(os, "copy_file_range", None)
    copied = 0
    if copy_file_range is None:
        return 0
    try:
        while copied < length:
            step = copy_file_range(
                source, destination, min(1 << 30, length - copied), offset + copied, destination_offset + copied
            )
            if step == 0:
                break
            copied += step
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
            raise
    return copied


class DataFile:
    """An external-data file being written: every tensor appended once, references handed back.

    :meth:`store` returns an ``ExternalTensor`` pointing into this file; a tensor already stored here is
    returned as is. Offsets of tensors above :data:`ALIGN_THRESHOLD_BYTES` are aligned to
    :data:`ALIGNMENT_BYTES` so that readers can memory-map them.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.location = self.path.name
        self._output = OutputFile(self.path)
        self._real_path = os.path.realpath(self.path)
        self.stored = 0  # tensors appended (0: nothing refers to this file)

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        return is_on_disk(tensor) and os.path.realpath(tensor.path) == self._real_path

    def store(self, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        if self.holds(tensor):
            return tensor
        length = tensor.nbytes
        if length > ALIGN_THRESHOLD_BYTES:
            self._output.pad_to(-(-self._output.position // ALIGNMENT_BYTES) * ALIGNMENT_BYTES)
        offset = self._output.position
        append_tensor(self._output, tensor)
        self.stored += 1
        if self._output.position - offset != length:
            raise InvalidModelError(f"tensor {tensor.name!r}: wrote {self._output.position - offset} of {length} bytes")
        return ir.ExternalTensor(
            self.location,
            offset,
            length,
            tensor.dtype,
            shape=ir.Shape(tensor.shape),
            name=tensor.name,
            doc_string=tensor.doc_string,
            base_dir=os.fspath(self.path.parent),
        )

    def close(self) -> None:
        self._output.close()
