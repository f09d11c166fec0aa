"""The protobuf wire format of ONNX model files, read and written without building whole messages.

Reading: :func:`scan_self_referencing` parses a self-contained ``.onnx`` file at the wire level and turns each
large main-graph initializer's ``raw_data`` into an external reference to its own byte range inside the file,
so loading costs the graph structure, not the weights (:func:`bnfold.files.load.open_lazily` uses it).

Writing: :func:`len_field` and :func:`encode_varint` build the field prefixes the streaming serialiser
(:mod:`bnfold.files.serialize`) writes in front of raw tensor bytes. Nothing here touches the graph's meaning.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import InvalidModelError
from bnfold.files.inputs import open_regular_file

# Protobuf field numbers (onnx.proto) and wire types used by the scanner and the streaming writer.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


class UnsupportedLayout(Exception):
    """The wire scan met something it does not handle; the caller parses the file the ordinary way."""


def read_varint(buffer: memoryview, position: int, end: int) -> tuple[int, int]:
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
    raise UnsupportedLayout("malformed varint")


def iter_fields(buffer: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, field start, payload start, field end)`` of each field in ``[start, end)``."""
    position = start
    while position < end:
        field_start = position
        key, position = read_varint(buffer, position, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == WIRE_VARINT:
            _, position = read_varint(buffer, position, end)
            payload = position
        elif wire_type == WIRE_I64:
            payload, position = position, position + 8
        elif wire_type == WIRE_I32:
            payload, position = position, position + 4
        elif wire_type == WIRE_LEN:
            length, payload = read_varint(buffer, position, end)
            position = payload + length
        else:
            raise UnsupportedLayout(f"wire type {wire_type}")
        if position > end or number == 0:
            raise UnsupportedLayout("field past the end of its message")
        yield number, wire_type, field_start, payload, position


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_field(number: int, payload_length: int) -> bytes:
    """The key and length prefix of a length-delimited field."""
    return encode_varint((number << 3) | WIRE_LEN) + encode_varint(payload_length)


def _external_reference(location: str, offset: int, length: int) -> bytes:
    tensor = onnx.TensorProto()
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor.SerializeToString()


def scan_self_referencing(path: Path, min_tensor_bytes: int) -> onnx.ModelProto:
    """The model at ``path`` with each main-graph initializer of at least ``min_tensor_bytes`` (serialised)
    having its ``raw_data`` replaced by a reference into the file.

    Raises:
        UnsupportedLayout: a layout the scan does not handle (the caller parses the file the ordinary way).
    """
    handle = open_regular_file(path, "", error=InvalidModelError)  # (never a FIFO swapped in after a check)
    with handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buffer = memoryview(mapped)
        try:
            return _rebuild_with_references(buffer, path.name, min_tensor_bytes)
        finally:
            buffer.release()


def _rebuild_with_references(buffer: memoryview, location: str, min_tensor_bytes: int) -> onnx.ModelProto:
    model_parts: list[bytes] = []
    graph_range: tuple[int, int] | None = None
    for number, wire_type, field_start, payload, field_end in iter_fields(buffer, 0, len(buffer)):
        if number == MODEL_GRAPH and wire_type == WIRE_LEN:
            if graph_range is not None:
                raise UnsupportedLayout("the graph field appears twice")
            graph_range = (payload, field_end)
        else:
            model_parts.append(bytes(buffer[field_start:field_end]))
    if graph_range is None:
        raise UnsupportedLayout("no graph")
    graph_parts: list[bytes] = []
    for number, wire_type, field_start, payload, field_end in iter_fields(buffer, *graph_range):
        if number == GRAPH_INITIALIZER and wire_type == WIRE_LEN and field_end - payload >= min_tensor_bytes:
            tensor = _tensor_with_reference(buffer, payload, field_end, location)
            graph_parts.append(len_field(GRAPH_INITIALIZER, len(tensor)) + tensor)
        else:
            graph_parts.append(bytes(buffer[field_start:field_end]))
    graph = b"".join(graph_parts)
    model = b"".join([*model_parts, len_field(MODEL_GRAPH, len(graph)), graph])
    try:
        return onnx.ModelProto.FromString(model)
    except (DecodeError, RecursionError) as error:  # (the loader then parses the file and says what is wrong)
        raise UnsupportedLayout(str(error)) from error


def _tensor_with_reference(buffer: memoryview, start: int, end: int, location: str) -> bytes:
    """The tensor message at ``[start, end)`` with its ``raw_data`` turned into an external reference."""
    header: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire_type, field_start, payload, field_end in iter_fields(buffer, start, end):
        if number == TENSOR_RAW_DATA and wire_type == WIRE_LEN:
            if raw is not None:
                raise UnsupportedLayout("raw_data appears twice")
            raw = (payload, field_end - payload)
        elif number in (13, 14):  # external_data, data_location: already external, keep the tensor as is
            return bytes(buffer[start:end])
        else:
            header.append(bytes(buffer[field_start:field_end]))
    if raw is None:
        return bytes(buffer[start:end])
    return b"".join(header) + _external_reference(location, *raw)
