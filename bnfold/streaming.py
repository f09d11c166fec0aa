"""Bounded-memory model files: lazy tensor reads, every written tensor written once, untouched bytes copied.

Reading (:func:`open_lazily`)
    Tensors stored as external data stay on disk (``onnx_ir.ExternalTensor``, memory-mapped when read). A large
    self-contained file is scanned at the protobuf wire level instead of being parsed whole: every main-graph
    initializer of at least :data:`LAZY_TENSOR_BYTES` becomes an external reference to its own ``raw_data``
    byte range inside the ``.onnx`` file, so loading costs the graph structure, not the weights.

Writing (:class:`DataFile`, :func:`write_model`)
    A tensor that is already on disk (an external reference into any file) is copied byte range to byte range
    (``os.copy_file_range``, in the kernel) without being decoded. A deferred weight is computed block by block
    by the writer threads (see Folding). An in-memory tensor is written straight from its numpy buffer. A
    self-contained model is streamed as protobuf: the graph structure is serialised by ``onnx_ir``, and each
    large initializer is appended as a wire-format ``TensorProto`` whose ``raw_data`` bytes come from the
    sources above, so no ``ModelProto`` holding all weights is ever built.

Folding (:func:`fold_to_staged`)
    A large folded weight is planned, not computed: the fold checks its range up front and leaves a
    :class:`~bnfold.passes.rule.ScaledWeight` (source weight, per-channel scale, dtype). With external-data
    output it is handed to the writer as soon as its BatchNormalization folds; writer threads compute it in
    blocks of a few MiB into a reused buffer and write each block at once, with direct I/O (``O_DIRECT``) where
    the file system allows, so a folded weight never exists whole in memory nor passes through the page cache.
    The peak memory is a few blocks plus the source pages being read, independent of the model size.
    Self-contained output computes its weights the same way while the file is streamed.

Preconditions: a little-endian host (x86-64, arm64) for the zero-copy numpy path; elsewhere
``TensorProtocol.tobytes`` is used. Nothing here prints.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bnfold import io
from bnfold.errors import InvalidModelError, UsageError
from bnfold.gc_pause import gc_paused
from bnfold.passes import FoldBatchNormPass
from bnfold.passes.rule import STREAM_BLOCK_BYTES, ScaledWeight
from bnfold.passes.scopes import model_graphs
from bnfold.report import BatchNormRecord, FoldReport

# Main-graph initializers at least this large are read lazily from a self-contained file.
LAZY_TENSOR_BYTES = 64 * 1024
# Below this file size a self-contained model is parsed whole (the wire scan would not pay off).
LAZY_FILE_BYTES = 16 * 1024**2
# In a self-contained output, initializers at least this large are streamed as raw bytes.
STREAMED_TENSOR_BYTES = 4 * 1024
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
_LITTLE_ENDIAN = sys.byteorder == "little"

# Protobuf field numbers (onnx.proto) and wire types used by the scanner and the streaming writer.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


class _UnsupportedLayout(Exception):
    """The wire scan met something it does not handle; the caller parses the file the ordinary way."""


def open_lazily(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` so that no large tensor is read before it is used (see the module docstring).

    External data is validated like :func:`bnfold.io.load_model` does. Small files, hard-linked files (which
    ``onnx_ir`` refuses to memory-map) and unusual protobuf layouts are loaded with :func:`bnfold.io.load_model`.

    Raises:
        InvalidModelError: as :func:`bnfold.io.load_model`.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return io.load_model(path)
    if not path.is_file() or stat.st_size < LAZY_FILE_BYTES or stat.st_nlink > 1:
        return io.load_model(path)
    try:
        proto = _scan_self_referencing(path)
    except _UnsupportedLayout:
        return io.load_model(path)
    io.check_model_proto(proto, source=path)
    io.check_external_data(proto, path.parent, source=path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:
        raise InvalidModelError(f"{path}: invalid ONNX model ({error})") from error
    io.finish_loading(model, path.parent, source=path)
    return model


def _read_varint(buffer: memoryview, position: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while position < end:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            break
    raise _UnsupportedLayout("malformed varint")


def _iter_fields(buffer: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, field start, payload start, field end)`` of each field in ``[start, end)``."""
    position = start
    while position < end:
        field_start = position
        key, position = _read_varint(buffer, position, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _WIRE_VARINT:
            _, position = _read_varint(buffer, position, end)
            payload = position
        elif wire_type == _WIRE_I64:
            payload, position = position, position + 8
        elif wire_type == _WIRE_I32:
            payload, position = position, position + 4
        elif wire_type == _WIRE_LEN:
            length, payload = _read_varint(buffer, position, end)
            position = payload + length
        else:
            raise _UnsupportedLayout(f"wire type {wire_type}")
        if position > end or number == 0:
            raise _UnsupportedLayout("field past the end of its message")
        yield number, wire_type, field_start, payload, position


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload_length: int) -> bytes:
    """The key and length prefix of a length-delimited field."""
    return _encode_varint((number << 3) | _WIRE_LEN) + _encode_varint(payload_length)


def _external_reference(location: str, offset: int, length: int) -> bytes:
    tensor = onnx.TensorProto()
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor.SerializeToString()


def _scan_self_referencing(path: Path) -> onnx.ModelProto:
    """The model at ``path`` with each large main-graph ``raw_data`` replaced by a reference into the file."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buffer = memoryview(mapped)
        try:
            return _rebuild_with_references(buffer, path.name)
        finally:
            buffer.release()


def _rebuild_with_references(buffer: memoryview, location: str) -> onnx.ModelProto:
    model_parts: list[bytes] = []
    graph_range: tuple[int, int] | None = None
    for number, wire_type, field_start, payload, field_end in _iter_fields(buffer, 0, len(buffer)):
        if number == _MODEL_GRAPH and wire_type == _WIRE_LEN:
            if graph_range is not None:
                raise _UnsupportedLayout("the graph field appears twice")
            graph_range = (payload, field_end)
        else:
            model_parts.append(bytes(buffer[field_start:field_end]))
    if graph_range is None:
        raise _UnsupportedLayout("no graph")
    graph_parts: list[bytes] = []
    for number, wire_type, field_start, payload, field_end in _iter_fields(buffer, *graph_range):
        if number == _GRAPH_INITIALIZER and wire_type == _WIRE_LEN and field_end - payload >= LAZY_TENSOR_BYTES:
            tensor = _tensor_with_reference(buffer, payload, field_end, location)
            graph_parts.append(_len_field(_GRAPH_INITIALIZER, len(tensor)) + tensor)
        else:
            graph_parts.append(bytes(buffer[field_start:field_end]))
    graph = b"".join(graph_parts)
    model = b"".join([*model_parts, _len_field(_MODEL_GRAPH, len(graph)), graph])
    try:
        return onnx.ModelProto.FromString(model)
    except Exception as error:
        raise _UnsupportedLayout(str(error)) from error


def _tensor_with_reference(buffer: memoryview, start: int, end: int, location: str) -> bytes:
    """The tensor message at ``[start, end)`` with its ``raw_data`` turned into an external reference."""
    header: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire_type, field_start, payload, field_end in _iter_fields(buffer, start, end):
        if number == _TENSOR_RAW_DATA and wire_type == _WIRE_LEN:
            if raw is not None:
                raise _UnsupportedLayout("raw_data appears twice")
            raw = (payload, field_end - payload)
        elif number in (13, 14):  # external_data, data_location: already external, keep the tensor as is
            return bytes(buffer[start:end])
        else:
            header.append(bytes(buffer[field_start:field_end]))
    if raw is None:
        return bytes(buffer[start:end])
    return b"".join(header) + _external_reference(location, *raw)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _raw_bytes(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's ``raw_data`` bytes, without a copy for contiguous little-endian numpy-backed tensors."""
    if _LITTLE_ENDIAN and isinstance(tensor, ir.Tensor) and tensor.dtype.bitwidth >= 8:
        array = tensor.numpy()
        native = isinstance(array, np.ndarray) and array.dtype.byteorder != ">" and array.dtype.kind != "O"
        if native and array.dtype.itemsize == tensor.dtype.itemsize:
            return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return tensor.tobytes()


def _append(output: _Output, tensor: ir.TensorProtocol) -> None:
    """Append the tensor's raw bytes: a byte-range copy, a deferred weight's blocks, or its buffer."""
    if _is_on_disk(tensor):
        output.copy_range(tensor.path, tensor.offset or 0, tensor.nbytes)
    elif _LITTLE_ENDIAN and isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, ScaledWeight):
        output.write_blocks(tensor.raw)
    else:
        output.write(_raw_bytes(tensor))


def _is_on_disk(tensor: ir.TensorProtocol) -> bool:
    return isinstance(tensor, ir.ExternalTensor)


def _can_stream(tensor: ir.TensorProtocol | None) -> bool:
    """Whether the tensor's bytes can be written as ``raw_data`` (every type but strings)."""
    return tensor is not None and tensor.dtype != ir.DataType.STRING


class _Output:
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
        self._output = _Output(self.path)
        self._real_path = os.path.realpath(self.path)

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        return _is_on_disk(tensor) and os.path.realpath(tensor.path) == self._real_path

    def store(self, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        if self.holds(tensor):
            return tensor
        length = tensor.nbytes
        if length > ALIGN_THRESHOLD_BYTES:
            self._output.pad_to(-(-self._output.position // ALIGNMENT_BYTES) * ALIGNMENT_BYTES)
        offset = self._output.position
        _append(self._output, tensor)
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


_PLACEHOLDER = "\x00bnfold-streamed"


def write_model(model: ir.Model, path: str | os.PathLike, data: DataFile | None = None) -> None:
    """Write ``model`` to the new file ``path``; with ``data``, initializers go to that external-data file.

    With ``data``: every initializer of at least ``io.EXTERNAL_DATA_THRESHOLD_BYTES`` and every tensor that is
    already external is stored in ``data`` (tensors already there are not written again). Without: a
    self-contained file; external tensors are read back in. ``model`` is unchanged afterwards (its tensor
    objects are restored).

    Raises:
        UsageError: a self-contained model would exceed the 2 GiB protobuf limit.
    """
    path = Path(path)
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    streamed: list[ir.TensorProtocol] = []

    def swap(value: ir.Value, replacement: ir.TensorProtocol) -> None:
        swapped.append((value, value.const_value))
        value.const_value = replacement

    try:
        for graph in model_graphs(model):
            is_main = graph is model.graph
            for value in graph.initializers.values():
                tensor = value.const_value
                if not _can_stream(tensor):
                    continue
                if data is not None:
                    if _is_on_disk(tensor) or tensor.nbytes >= io.EXTERNAL_DATA_THRESHOLD_BYTES:
                        swap(value, data.store(tensor))
                elif is_main and tensor.nbytes >= STREAMED_TENSOR_BYTES:
                    swap(value, _placeholder(tensor, len(streamed)))
                    streamed.append(tensor)
                elif _is_on_disk(tensor):
                    swap(value, ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name))
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in reversed(swapped):
            value.const_value = tensor
    if data is not None:
        output = _Output(path)
        try:
            output.write(proto.SerializeToString())
        finally:
            output.close()
        return
    _stream_self_contained(proto, streamed, path)


def _order_value_info_like_initializers(graph: onnx.GraphProto, initializer_order: list[str]) -> None:
    """Put the initializers' value_info entries in the order the initializers are written.

    Streamed (large) initializers are written after the others; reloading such a file lists them in that
    order, so writing the value_info in the same order makes a load-and-save round trip byte-stable.
    """
    position = {name: index for index, name in enumerate(initializer_order)}
    names = [entry.name for entry in graph.value_info]
    listed = [index for index, name in enumerate(names) if name in position]
    wanted = sorted(listed, key=lambda index: position[names[index]])
    order = wanted + [index for index, name in enumerate(names) if name not in position]
    if order == list(range(len(names))):
        return  # already in that order (rewriting the repeated field costs a copy of every entry)
    entries = list(graph.value_info)
    del graph.value_info[:]
    graph.value_info.extend(entries[index] for index in order)


def _placeholder(tensor: ir.TensorProtocol, index: int) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        _PLACEHOLDER,
        index,
        tensor.nbytes,
        tensor.dtype,
        shape=ir.Shape(tensor.shape),
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props) if tensor.metadata_props else None,
    )


def _stream_self_contained(proto: onnx.ModelProto, streamed: list[ir.TensorProtocol], path: Path) -> None:
    """Write ``proto`` with the placeholder initializers filled by ``streamed`` tensors' raw bytes."""
    kept: list[onnx.TensorProto] = []
    headers: list[tuple[bytes, ir.TensorProtocol]] = []
    for tensor_proto in proto.graph.initializer if streamed else ():
        if tensor_proto.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(tensor_proto)
            continue
        entries = {entry.key: entry.value for entry in tensor_proto.external_data}
        if entries.get("location") != _PLACEHOLDER:
            kept.append(tensor_proto)
            continue
        source = streamed[int(entries["offset"])]
        tensor_proto.ClearField("external_data")
        tensor_proto.ClearField("data_location")
        headers.append((tensor_proto.SerializeToString(), source))
    if streamed:  # (without streamed tensors the initializers keep their order)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    kept_names = [tensor.name for tensor in proto.graph.initializer]
    _order_value_info_like_initializers(proto.graph, [*kept_names, *(s.name for s in streamed)])
    graph_head = proto.graph.SerializeToString()
    proto.ClearField("graph")
    model_head = proto.SerializeToString()
    prefixes = []
    graph_length = len(graph_head)
    for header, tensor in headers:
        raw_prefix = _len_field(_TENSOR_RAW_DATA, tensor.nbytes)
        tensor_length = len(header) + len(raw_prefix) + tensor.nbytes
        prefix = _len_field(_GRAPH_INITIALIZER, tensor_length) + header + raw_prefix
        prefixes.append(prefix)
        graph_length += len(prefix) + tensor.nbytes
    total = len(model_head) + len(_len_field(_MODEL_GRAPH, graph_length)) + graph_length
    if total >= io.PROTOBUF_LIMIT_BYTES:
        raise UsageError(f"{path.name}: {total} bytes exceed the 2 GiB protobuf limit; save with external data")
    output = _Output(path)
    try:
        output.write(model_head + _len_field(_MODEL_GRAPH, graph_length) + graph_head)
        for prefix, (_, tensor) in zip(prefixes, headers, strict=True):
            output.write(prefix)
            start = output.position
            _append(output, tensor)
            if output.position - start != tensor.nbytes:
                raise InvalidModelError(f"tensor {tensor.name!r}: wrote {output.position - start} bytes")
    finally:
        output.close()


# --------------------------------------------------------------------------------------------------------
# Folding one file into another
# --------------------------------------------------------------------------------------------------------


class _SpillingFoldPass(FoldBatchNormPass):
    """The fold pass, with each folded tensor moved to ``data`` right after its BatchNormalization folds.

    Uses the pass's public ``on_folded`` hook: only the nodes the fold rewrote are looked at, so the extra
    work is constant per BN. A folded tensor elsewhere is still written correctly, by :func:`write_model`.
    """

    def __init__(
        self,
        data: DataFile,
        *,
        only: Iterable[str] | None,
        skip: Iterable[str] | None,
        lower_standalone: bool = False,
    ) -> None:
        super().__init__(only=only, skip=skip, lower_standalone=lower_standalone, on_folded=self._spill)
        self._data = data

    def _spill(self, record: BatchNormRecord, rewritten: tuple[ir.Node, ...]) -> None:
        for node in rewritten:
            if node.graph is None:
                continue
            for value in node.inputs:
                tensor = value.const_value if value is not None and value.is_initializer() else None
                if type(tensor) is ir.Tensor and tensor.nbytes >= io.EXTERNAL_DATA_THRESHOLD_BYTES:
                    value.const_value = self._data.store(tensor)


@dataclasses.dataclass
class StagedFold:
    """A folded model written under a temporary directory (see :class:`bnfold.io.StagedModel`)."""

    staged: io.StagedModel
    report: FoldReport
    size_before: int


def fold_to_staged(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    lower_standalone: bool = False,
    external_data: bool | None = None,
) -> StagedFold:
    """Fold the model file ``source`` into a staged ``destination`` with memory bounded by a few tensors.

    ``external_data=None`` keeps the source's layout (external data when the source has any). The input
    files are never written; the output data file never takes the name of a file the input reads.
    Commit (or discard) ``result.staged``; use it as a context manager. The folded model itself is not kept,
    so nothing of it stays in memory while the staged files are verified.

    Raises:
        InvalidModelError: the source cannot be read. UsageError: unknown rule names, missing output directory.
    """
    with gc_paused():  # (see bnfold.gc_pause: collections would traverse the whole graph, often)
        return _fold_to_staged(source, destination, only, skip, lower_standalone, external_data)


def _fold_to_staged(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    only: Iterable[str] | None,
    skip: Iterable[str] | None,
    lower_standalone: bool,
    external_data: bool | None,
) -> StagedFold:
    from bnfold.api import make_fold_pass

    make_fold_pass(only, skip, lower_standalone=lower_standalone)  # validates rule names with the API's error message
    model = open_lazily(source)
    read = io.external_files(model)  # (one walk over the graph, shared by the three uses below)
    itself = Path(os.path.realpath(source))
    size_before = io.files_size_bytes(source, read_files=read)
    for file in read - {itself}:  # (replacing the model file itself is an in-place fold)
        if io.is_same_file(destination, file):
            raise UsageError(f"{destination}: the output would overwrite {file}, which the model is read from")
    if external_data is None:
        external_data = bool(read - {itself})  # external data in other files (not a lazily read .onnx)
    staged = io.create_staging(model, destination, external_data=external_data, read_files=read)
    try:
        if staged.data_name is not None:
            data = DataFile(staged.path.parent / staged.data_name)
            try:
                result = _SpillingFoldPass(data, only=only, skip=skip, lower_standalone=lower_standalone)(model)
                write_model(result.model, staged.path, data)
            finally:
                data.close()
        else:
            result = make_fold_pass(only, skip, lower_standalone=lower_standalone)(model)
            write_model(result.model, staged.path)
    except BaseException:
        staged.discard()
        raise
    return StagedFold(staged=staged, report=result.report, size_before=size_before)
