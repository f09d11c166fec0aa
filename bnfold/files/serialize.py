"""Serialising an ``onnx_ir`` model to a new file without ever building one protobuf that holds all weights.

With a :class:`~bnfold.files.writer.DataFile`, every initializer of at least
:data:`EXTERNAL_DATA_THRESHOLD_BYTES` (and every tensor already external) goes to the data file and the
``.onnx`` holds the graph. Without, a self-contained model is streamed as protobuf: the graph structure is
serialised by ``onnx_ir``, and each large initializer is appended as a wire-format ``TensorProto`` whose
``raw_data`` bytes come from the writer (byte-range copy, deferred weight's blocks or the numpy buffer).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, UsageError
from bnfold.files.inputs import open_regular_file
from bnfold.files.load import INITIALIZER_INFO_META
from bnfold.files.wire import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, len_field
from bnfold.files.writer import DataFile, OutputFile, append_tensor, is_on_disk
from bnfold.passes.scopes import model_graphs

# Models above this size cannot be serialised as one protobuf (2 GiB limit), so they go to external data.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3
# Up to this size, a written model equal to its source is replaced by a byte copy of it (:func:`keep_source_bytes`).
SAME_CONTENT_CHECK_BYTES = 16 * 1024**2
# Tensors smaller than this stay inside the .onnx file when external data is written.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
# In a self-contained output, initializers at least this large are streamed as raw bytes.
STREAMED_TENSOR_BYTES = 4 * 1024


def _can_stream(tensor: ir.TensorProtocol | None) -> bool:
    """Whether the tensor's bytes can be written as ``raw_data`` (every type but strings)."""
    return tensor is not None and tensor.dtype != ir.DataType.STRING


_PLACEHOLDER = "\x00bnfold-streamed"


def write_model(model: ir.Model, path: str | os.PathLike, data: DataFile | None = None) -> None:
    """Write ``model`` to the new file ``path``; with ``data``, initializers go to that external-data file.

    With ``data``: every initializer of at least ``EXTERNAL_DATA_THRESHOLD_BYTES`` and every tensor that is
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
                    if is_on_disk(tensor) or tensor.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES:
                        swap(value, data.store(tensor))
                elif is_main and tensor.nbytes >= STREAMED_TENSOR_BYTES:
                    swap(value, _placeholder(tensor, len(streamed)))
                    streamed.append(tensor)
                elif is_on_disk(tensor):
                    swap(value, ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name))
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in reversed(swapped):
            value.const_value = tensor
    declared = model.meta.get(INITIALIZER_INFO_META)
    if declared is not None:
        _drop_added_initializer_info(proto.graph, declared)
    if data is not None:
        output = OutputFile(path)
        try:
            output.write(proto.SerializeToString())
        finally:
            output.close()
        return
    _stream_self_contained(proto, streamed, path)


def _drop_added_initializer_info(graph: onnx.GraphProto, declared: frozenset[str]) -> None:
    """Remove the ``value_info`` entries onnx_ir adds for initializers the source file did not declare.

    onnx_ir gives every initializer a type and shape on load and writes a ``value_info`` entry for each, so an
    unchanged model would grow by one entry per initializer. An entry is dropped only when it says no more than
    the initializer itself (same element type, same fixed dimensions) and the source (``declared``: names from
    :data:`~bnfold.files.load.INITIALIZER_INFO_META`) had none; graph inputs are not initializer entries.
    """
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    inputs = {value.name for value in graph.input}

    def redundant(info: onnx.ValueInfoProto) -> bool:
        tensor = tensors.get(info.name)
        if tensor is None or info.name in declared or info.name in inputs or info.doc_string or info.metadata_props:
            return False
        if info.type.WhichOneof("value") != "tensor_type":
            return False
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type != tensor.data_type or not tensor_type.HasField("shape"):
            return False
        dims = tensor_type.shape.dim
        return len(dims) == len(tensor.dims) and all(
            dim.HasField("dim_value") and dim.dim_value == size and not dim.denotation
            for dim, size in zip(dims, tensor.dims, strict=True)
        )

    entries = list(graph.value_info)
    kept = [info for info in entries if not redundant(info)]
    if len(kept) != len(entries):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _drop_added_initializer_info(attribute.g, declared)
            for subgraph in attribute.graphs:
                _drop_added_initializer_info(subgraph, declared)


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
        raw_prefix = len_field(TENSOR_RAW_DATA, tensor.nbytes)
        tensor_length = len(header) + len(raw_prefix) + tensor.nbytes
        prefix = len_field(GRAPH_INITIALIZER, tensor_length) + header + raw_prefix
        prefixes.append(prefix)
        graph_length += len(prefix) + tensor.nbytes
    total = len(model_head) + len(len_field(MODEL_GRAPH, graph_length)) + graph_length
    if total >= PROTOBUF_LIMIT_BYTES:
        raise UsageError(f"{path.name}: {total} bytes exceed the 2 GiB protobuf limit; save with external data")
    output = OutputFile(path)
    try:
        output.write(model_head + len_field(MODEL_GRAPH, graph_length) + graph_head)
        for prefix, (_, tensor) in zip(prefixes, headers, strict=True):
            output.write(prefix)
            start = output.position
            append_tensor(output, tensor)
            if output.position - start != tensor.nbytes:
                raise InvalidModelError(f"tensor {tensor.name!r}: wrote {output.position - start} bytes")
    finally:
        output.close()


def keep_source_bytes(source: str | os.PathLike, written: str | os.PathLike) -> bool:
    """Replace the new self-contained file ``written`` by a byte copy of ``source`` when both hold the same model.

    For a fold that changed nothing: re-serialising may differ from the input in encoding only (field order, an
    explicit default opset domain, the order of the main graph's initializers and value_info entries, neither of
    which means anything), and an unchanged model should come out as the input's bytes. The two files are parsed
    and compared as protobuf messages, so a model that differs in any field keeps its written bytes.
    Only files up to :data:`SAME_CONTENT_CHECK_BYTES` are compared (both are held in memory); returns whether
    ``written`` now holds ``source``'s bytes.
    """
    source, written = Path(source), Path(written)
    if written.stat().st_size > SAME_CONTENT_CHECK_BYTES:
        return False
    with open_regular_file(source, "", error=InvalidModelError) as handle:
        if os.fstat(handle.fileno()).st_size > SAME_CONTENT_CHECK_BYTES:
            return False
        original = handle.read()
    models = []
    for data in (original, written.read_bytes()):
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception:  # (protobuf's DecodeError; the source was parsed before, so this is not expected)
            return False
        for opset in model.opset_import:
            opset.domain = opset.domain  # an omitted default domain and an explicit "" mean the same
        for field in (model.graph.initializer, model.graph.value_info):  # (large initializers are written last)
            entries = sorted(field, key=lambda entry: entry.name)
            del field[:]
            field.extend(entries)
        models.append(model)
    if models[0] != models[1]:
        return False
    with open(written, "wb") as output:
        output.write(original)
    return True
