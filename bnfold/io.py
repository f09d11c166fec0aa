"""Graph I/O: load models into onnx_ir (external data stays lazy), check external-data safety, save atomically.

Loading never modifies the input. Saving writes every file to a temporary name in the destination's directory
and renames it into place, so a reader never sees a half-written model and a crash leaves the previous state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, UsageError

# Models above this size cannot be serialised as one protobuf (2 GiB limit), so they go to external data.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3
# Tensors smaller than this stay inside the .onnx file when external data is written.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
# ``ir.Model.meta`` key set by the loaders: frozenset of the resolved files the model was read from.
SOURCE_FILES_META = "bnfold.source_files"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load the model at ``path``; external tensors stay on disk and are memory-mapped when read.

    The model is checked before anything else looks at it (see :func:`check_model_proto` and
    :func:`check_external_data`), so a malformed or hostile file ends here with one clear message.

    Raises:
        InvalidModelError: the path is missing or not a file, the bytes are not an ONNX model, the graph is
            malformed, or an external-data reference is unsafe or broken.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file")
        if not path.is_file():
            raise InvalidModelError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise InvalidModelError(f"{path}: empty file")
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except InvalidModelError:
        raise
    except OSError as error:  # permission denied, I/O error, name too long
        raise InvalidModelError(f"{path}: cannot read ({error.strerror or _one_line(error)})") from error
    except Exception as error:  # protobuf's DecodeError for bytes that are not a model
        raise InvalidModelError(f"{path}: not a valid ONNX model ({_one_line(error)})") from error
    check_model_proto(proto, source=path)
    check_external_data(proto, path.parent, source=path)
    model = _deserialize(proto, source=path)
    finish_loading(model, path.parent, source=path)
    return model


def as_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Accept a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and return an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as is (callers that must not change it copy it first). A ``ModelProto`` is
    checked like a file; its external data, if any, is refused (no directory to resolve it against).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        check_model_proto(model, source="<ModelProto>")
        check_external_data(model, None, source="<ModelProto>")
        loaded = _deserialize(model, source="<ModelProto>")
        finish_loading(loaded, None, source="<ModelProto>")
        return loaded
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def finish_loading(model: ir.Model, base_dir: Path | None, *, source: object) -> None:
    """Complete a model deserialised from a checked protobuf (every loader calls this last).

    - external tensors resolve against ``base_dir``, the model file's directory (``None``: no file);
    - external FLOAT6 initializers are read once, since their packing is validated only when decoded;
    - external tensors held by node attributes (Constant values) are read into memory: only initializers are
      written back as external data, so such a reference would point at a file the output lacks;
    - ``model.meta[SOURCE_FILES_META]`` records the resolved paths of the model file (``source`` when it is a
      path) and of every external-data file it reads, so that a writer can refuse to replace any of them even
      after folding dropped the last tensor that read a file (``model.clone()`` does not copy ``meta``);
    - the nodes are sorted topologically (stable: a sorted graph keeps its order). ONNX requires that order
      and :func:`check_model_proto` refused cycles, but out-of-order files exist and passes (``clone``,
      shape inference) assume the order.
    """
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, os.fspath(base_dir))
    try:
        model.graph.sort()
    except Exception as error:  # a cycle check_model_proto did not see (through a subgraph)
        raise InvalidModelError(f"{source}: the graph cannot be ordered ({_one_line(error)})") from error
    source_files = {Path(os.path.realpath(source))} if isinstance(source, (str, os.PathLike)) else set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                source_files.add(Path(os.path.realpath(tensor.path)))
                if tensor.dtype.bitwidth == 6:
                    _in_memory(tensor, source)  # FLOAT6 data must have zero padding bits: validate now
    bodies: list[ir.Graph | ir.Function] = [*model.graphs(), *model.functions.values()]
    for body in bodies:
        for node in body:
            for name, attribute in list(node.attributes.items()):
                if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                    node.attributes[name] = ir.AttrTensor(name, _in_memory(attribute.value, source))
                elif attribute.type == ir.AttributeType.TENSORS and any(
                    isinstance(tensor, ir.ExternalTensor) for tensor in attribute.value
                ):
                    tensors = [_in_memory(tensor, source) for tensor in attribute.value]
                    node.attributes[name] = ir.AttrTensors(name, tensors)
    model.meta[SOURCE_FILES_META] = frozenset(source_files)


def _in_memory(tensor: ir.TensorProtocol, source: object) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    try:
        return ir.Tensor(tensor.numpy().copy(), name=tensor.name)
    except Exception as error:
        message = f"{source}: tensor {tensor.name!r}: cannot read external data ({_one_line(error)})"
        raise InvalidModelError(message) from error


def _deserialize(proto: onnx.ModelProto, *, source: object) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as error:
        raise InvalidModelError(f"{source}: invalid ONNX model ({_one_line(error)})") from error


# --- structural checks of the protobuf, before onnx_ir or any pass sees it ----------------------------------

# The largest opset version accepted (the onnx API takes a C int; real versions are two-digit numbers).
_MAX_SCHEMA_VERSION = 2**31 - 1
_VALID_ATTRIBUTE_TYPES = frozenset(onnx.AttributeProto.AttributeType.values()) - {onnx.AttributeProto.UNDEFINED}


def check_model_proto(proto: onnx.ModelProto, *, source: object) -> None:
    """Refuse a protobuf that is not a well-formed ONNX model, with a one-line reason naming ``source``.

    Checked, for the main graph, every subgraph and every model-local function:

    - there is a graph; opset versions are in 1..2**31-1 and each domain is imported once;
    - every value is defined once (graph input, initializer or node output; no shadowing of an enclosing
      graph), every node input and graph output is defined (here or in an enclosing graph), and the nodes
      have no cycle (they may be out of order: ``onnx_ir`` connects values by name);
    - attributes have a valid type, one per name, and the type the op's schema declares; input and output
      counts fit the schema (ops without a known schema — custom domains, newer opsets — are not checked);
    - every tensor (initializers, Constant values) has a known data type, non-negative dims, and exactly the
      data its shape needs in a field its type may use; FLOAT6 data decodes (external tensors: see
      :func:`check_external_data`).
    """
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{source}: not an ONNX model (the protobuf has no graph)")
    invalid_text = _invalid_text_field(proto)
    if invalid_text is not None:
        raise InvalidModelError(f"{source}: field {invalid_text} is not valid UTF-8 text")
    if len(proto.graph.sparse_initializer):
        raise InvalidModelError(f"{source}: sparse initializers are not supported")
    opsets = _opset_versions(proto.opset_import, f"{source}: model")
    _check_graph(proto.graph, frozenset(), opsets, f"{source}: graph {proto.graph.name or 'main'!r}")
    for function in proto.functions:
        where = f"{source}: function {function.domain}::{function.name}"
        function_opsets = _opset_versions(function.opset_import, where) or opsets
        defined = _define_all(function.input, (), function.node, frozenset(), where)
        _check_nodes(function.node, defined, frozenset(), function_opsets, where)
        _check_outputs(function.output, defined, frozenset(), where)


def _invalid_text_field(message) -> str | None:
    """The full name of a ``string`` field holding bytes that are not UTF-8 (protobuf hands those as bytes)."""
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        items = value if repeated else (value,)
        if field.type == field.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            return field.full_name
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                found = _invalid_text_field(item)
                if found is not None:
                    return found
    return None


def _opset_versions(imports, where: str) -> dict[str, int]:
    versions: dict[str, int] = {}
    for entry in imports:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        if domain in versions:
            raise InvalidModelError(f"{where}: opset domain {entry.domain!r} is imported twice")
        if not 1 <= entry.version <= _MAX_SCHEMA_VERSION:
            raise InvalidModelError(f"{where}: opset version {entry.version} of domain {entry.domain!r} is invalid")
        versions[domain] = entry.version
    return versions


def _define_all(inputs, initializers, nodes, outer: frozenset[str], where: str) -> set[str]:
    """Every name the body defines; refuse a name defined twice or shadowing an enclosing graph's value."""
    defined: set[str] = set()
    for value in inputs:
        name = value if isinstance(value, str) else value.name
        if name in defined:
            raise InvalidModelError(f"{where}: input {name!r} is declared twice")
        defined.add(name)
    seen_initializers: set[str] = set()
    for index, tensor in enumerate(initializers):
        if not tensor.name:
            raise InvalidModelError(f"{where}: initializer #{index} has no name")
        if tensor.name in seen_initializers:
            raise InvalidModelError(f"{where}: initializer {tensor.name!r} is defined twice")
        seen_initializers.add(tensor.name)
        defined.add(tensor.name)  # an initializer may also be a graph input (its default)
    for node in nodes:
        for name in node.output:
            if not name:
                continue
            if name in defined:
                raise InvalidModelError(f"{where}: value {name!r} is produced twice (again by node {node.name!r})")
            if name in outer:
                raise InvalidModelError(f"{where}: node {node.name!r} output {name!r} shadows an outer value")
            defined.add(name)
    return defined


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], opsets: dict[str, int], where: str) -> None:
    for tensor in graph.initializer:
        _check_tensor(tensor, f"{where}: tensor {tensor.name!r}")
    defined = _define_all(graph.input, graph.initializer, graph.node, outer, where)
    _check_nodes(graph.node, defined, outer, opsets, where)
    _check_outputs(graph.output, defined, outer, where)
    visible = outer | defined
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for index, subgraph in enumerate([*subgraphs, *attribute.graphs]):
                label = f"{where}/{node.name or node.op_type}.{attribute.name}"
                _check_graph(subgraph, visible, opsets, label if not attribute.graphs else f"{label}[{index}]")


def _check_outputs(outputs, defined: set[str], outer: frozenset[str], where: str) -> None:
    for value in outputs:
        name = value if isinstance(value, str) else value.name
        if name not in defined and name not in outer:
            raise InvalidModelError(f"{where}: output {name!r} is not produced by any node, input or initializer")


def _check_nodes(nodes, defined: set[str], outer: frozenset[str], opsets: dict[str, int], where: str) -> None:
    for node in nodes:
        for name in node.input:
            if name and name not in defined and name not in outer:
                raise InvalidModelError(
                    f"{where}: node {node.name!r} ({node.op_type}) reads {name!r}, which nothing defines"
                )
        _check_node_against_schema(node, opsets, where)
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.HasField("t") else []
            for tensor in [*tensors, *attribute.tensors]:
                _check_tensor(tensor, f"{where}: node {node.name!r} attribute {attribute.name!r}")
    _check_acyclic(nodes, where)


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing graphs (read anywhere inside it, defined nowhere inside it)."""
    local = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    read: set[str] = {value.name for value in graph.output}
    for node in graph.node:
        local.update(node.output)
        read.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else []:
                read |= _free_names(subgraph)
            for subgraph in attribute.graphs:
                read |= _free_names(subgraph)
    return {name for name in read if name and name not in local}


def _check_acyclic(nodes, where: str) -> None:
    """Kahn's algorithm over "reads a value produced by": refuse the body when some node never becomes ready."""
    producer_of = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    readers: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        names = set(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else []:
                names |= _free_names(subgraph)
            for subgraph in attribute.graphs:
                names |= _free_names(subgraph)
        sources = {producer_of[name] for name in names if name in producer_of}
        pending[index] = len(sources)
        for source in sources:
            readers[source].append(index)
    ready = [index for index, count in enumerate(pending) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for reader in readers[index]:
            pending[reader] -= 1
            if pending[reader] == 0:
                ready.append(reader)
    if done != len(nodes):
        stuck = next(nodes[index] for index, count in enumerate(pending) if count > 0)
        raise InvalidModelError(f"{where}: the graph has a cycle through node {stuck.name!r} ({stuck.op_type})")


_schema_cache: dict[tuple[str, str, int], object] = {}


def _schema(op_type: str, domain: str, version: int):
    key = (op_type, domain, min(version, _MAX_SCHEMA_VERSION))
    if key not in _schema_cache:
        try:
            _schema_cache[key] = onnx.defs.get_schema(op_type, key[2], domain)
        except (onnx.defs.SchemaError, TypeError, ValueError):
            _schema_cache[key] = None
    return _schema_cache[key]


def _check_node_against_schema(node: onnx.NodeProto, opsets: dict[str, int], where: str) -> None:
    names: set[str] = set()
    for attribute in node.attribute:
        if not attribute.name or attribute.name in names:
            raise InvalidModelError(f"{where}: node {node.name!r} has a nameless or repeated attribute")
        names.add(attribute.name)
        if attribute.type not in _VALID_ATTRIBUTE_TYPES:
            raise InvalidModelError(f"{where}: node {node.name!r} attribute {attribute.name!r} has no valid type")
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, 1 if domain == "" else None)  # no import: opset 1, as the fold pass assumes
    schema = _schema(node.op_type, domain, version) if version is not None and node.op_type else None
    if schema is None:
        return  # unknown op, custom domain or opset newer than this onnx: nothing to check against
    what = f"{where}: node {node.name!r} ({node.op_type}, opset {version})"
    for kind, names, formals, low, high in (
        ("inputs", node.input, schema.inputs, schema.min_input, schema.max_input),
        ("outputs", node.output, schema.outputs, schema.min_output, schema.max_output),
    ):
        if not low <= len(names) <= high:
            raise InvalidModelError(f"{what} has {len(names)} {kind}, expected {low}..{high}")
        # A required (single) input or output may not be left out with an empty name.
        for name, formal in zip(names, formals, strict=False):
            if not name and formal.option == onnx.defs.OpSchema.FormalParameterOption.Single:
                raise InvalidModelError(f"{what}: required {kind[:-1]} {formal.name!r} is empty")
    for attribute in node.attribute:
        declared = schema.attributes.get(attribute.name)
        if declared is not None and not attribute.ref_attr_name and int(declared.type.value) != attribute.type:
            actual = onnx.AttributeProto.AttributeType.Name(attribute.type)
            raise InvalidModelError(f"{what} attribute {attribute.name!r} is {actual}, expected {declared.type.name}")


# Which typed field may hold a data type's values, and how many elements one entry of that field holds.
_TYPED_FIELDS = {
    "float_data": {ir.DataType.FLOAT, ir.DataType.COMPLEX64},
    "double_data": {ir.DataType.DOUBLE, ir.DataType.COMPLEX128},
    "int64_data": {ir.DataType.INT64},
    "uint64_data": {ir.DataType.UINT32, ir.DataType.UINT64},
    "string_data": {ir.DataType.STRING},
}
_INT32_FIELD_TYPES = frozenset(
    dtype for dtype in ir.DataType if dtype not in {ir.DataType.UNDEFINED}.union(*_TYPED_FIELDS.values())
)


def tensor_dtype_and_size(tensor: onnx.TensorProto, where: str) -> tuple[ir.DataType, int]:
    """The tensor's data type and element count; refuse unknown types, negative dims and unrepresentable shapes.

    numpy refuses a shape whose non-zero dims need more than 2**63 bytes, even when another dim is 0.
    """
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError as error:
        raise InvalidModelError(f"{where}: unknown data type {tensor.data_type}") from error
    if dtype == ir.DataType.UNDEFINED:
        raise InvalidModelError(f"{where}: data type is UNDEFINED")
    if any(dim < 0 for dim in tensor.dims):
        raise InvalidModelError(f"{where}: negative dimension in shape {list(tensor.dims)}")
    count, extent = 1, 16  # extent: bytes of the non-zero dims at 16 bytes per element (complex128, the widest)
    for dim in tensor.dims:
        count *= dim
        extent *= max(dim, 1)
    if extent >= 2**63:
        raise InvalidModelError(f"{where}: shape {list(tensor.dims)} is too large to represent")
    return dtype, count


def tensor_nbytes(dtype: ir.DataType, count: int) -> int:
    """Bytes of ``count`` packed elements of ``dtype`` (sub-byte types round up to whole bytes)."""
    return (count * dtype.bitwidth + 7) // 8


def _check_tensor(tensor: onnx.TensorProto, where: str) -> None:
    """An inline tensor holds exactly the data its dtype and shape need, in a field that dtype may use."""
    dtype, count = tensor_dtype_and_size(tensor, where)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if dtype == ir.DataType.STRING:
            raise InvalidModelError(f"{where}: string tensors cannot be stored as external data")
        return  # sizes are checked against the data file by check_external_data
    if tensor.HasField("raw_data"):
        if dtype == ir.DataType.STRING:
            raise InvalidModelError(f"{where}: string tensor with raw_data")
        expected, held = tensor_nbytes(dtype, count), len(tensor.raw_data)  # (protobuf copies the bytes once)
        if held != expected:
            raise InvalidModelError(
                f"{where}: shape {list(tensor.dims)} of {dtype.name} needs {expected} bytes, raw_data has {held}"
            )
    else:
        held = {name: len(getattr(tensor, name)) for name in (*_TYPED_FIELDS, "int32_data") if getattr(tensor, name)}
        if len(held) > 1:
            raise InvalidModelError(f"{where}: data in several fields ({', '.join(sorted(held))})")
        field, entries = next(iter(held.items()), (None, 0))
        allowed = _TYPED_FIELDS.get(field, _INT32_FIELD_TYPES) if field else set()
        if field and dtype not in allowed:
            raise InvalidModelError(f"{where}: {dtype.name} values cannot be stored in {field}")
        expected = _entries_needed(dtype, count)
        if entries != expected:
            raise InvalidModelError(
                f"{where}: shape {list(tensor.dims)} of {dtype.name} needs {expected} values, found {entries}"
            )
    if dtype != ir.DataType.STRING and dtype.bitwidth == 6:  # FLOAT6 packing is only validated when decoded
        try:
            ir.serde.TensorProtoTensor(tensor).tobytes()
        except Exception as error:
            raise InvalidModelError(f"{where}: malformed tensor data ({_one_line(error)})") from error


def _entries_needed(dtype: ir.DataType, count: int) -> int:
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        return 2 * count
    if dtype != ir.DataType.STRING and dtype.bitwidth in (2, 4):
        return (count * dtype.bitwidth + 7) // 8  # packed: one int32 entry per byte
    return count


def _iter_tensor_protos(proto: onnx.ModelProto):
    def from_attributes(node: onnx.NodeProto):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from from_graph(attribute.g)
            for subgraph in attribute.graphs:
                yield from from_graph(subgraph)

    def from_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            yield from from_attributes(node)

    yield from from_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from from_attributes(node)


def check_external_data(proto: onnx.ModelProto, base_dir: Path | None, *, source: object) -> None:
    """Refuse external-data references that escape the model's directory or point past the data file.

    A location must be relative, contain no ``..`` component, and resolve (symlinks included) inside
    ``base_dir``; the referenced file must be a regular file with one hard link (a hard link can be any file of
    the file system, and ``onnx_ir`` refuses to map one) holding ``offset + length`` bytes, and
    ``length`` (or, without one, the rest of the file) must cover the bytes the tensor's shape needs.
    """
    resolved_base = base_dir.resolve() if base_dir is not None else None
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"{source}: tensor {tensor.name!r}"
        dtype, count = tensor_dtype_and_size(tensor, where)
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise InvalidModelError(f"{where}: external data without a location")
        if "\x00" in location:
            raise InvalidModelError(f"{where}: external-data location contains a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise InvalidModelError(f"{where}: absolute external-data location {location!r} refused")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise InvalidModelError(f"{where}: external-data location {location!r} contains '..'")
        if resolved_base is None:
            raise InvalidModelError(f"{where}: external data needs the model's file path to resolve")
        try:
            target = (resolved_base / location).resolve()
            inside = resolved_base in target.parents
            is_file = inside and target.is_file()
            stat = target.stat() if is_file else None
        except (OSError, ValueError, RuntimeError) as error:
            raise InvalidModelError(f"{where}: external-data location {location!r} unusable ({error})") from error
        if not inside:
            raise InvalidModelError(f"{where}: external-data location {location!r} resolves outside {base_dir}")
        if stat is None:
            raise InvalidModelError(f"{where}: external-data file {location!r} not found")
        if stat.st_nlink > 1:  # a hard link may be a file from anywhere on the file system; onnx_ir refuses it too
            raise InvalidModelError(
                f"{where}: external-data file {location!r} has {stat.st_nlink} hard links; refused (copy it instead)"
            )
        size = stat.st_size
        offset, length = _external_offset_length(entries, where)
        available = size - offset if length is None else length
        needed = tensor_nbytes(dtype, count)
        if offset > size or offset + (length or 0) > size:
            raise InvalidModelError(
                f"{where}: external data {location!r} is truncated (needs {offset + (length or 0)} bytes, "
                f"file has {size})"
            )
        if needed > available:
            raise InvalidModelError(
                f"{where}: shape {list(tensor.dims)} of {dtype.name} needs {needed} bytes, external data "
                f"{location!r} holds {available}"
            )


def _external_offset_length(entries: dict[str, str], where: str) -> tuple[int, int | None]:
    """``offset`` and ``length`` as non-negative decimal integers (``length`` may be absent)."""
    values = []
    for key in ("offset", "length"):
        text = entries.get(key, "")
        if not text:
            values.append(0 if key == "offset" else None)
            continue
        if not text.isascii() or not text.isdigit():
            raise InvalidModelError(f"{where}: external-data {key} {text!r} is not a non-negative integer")
        values.append(int(text))
    return values[0], values[1]


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of any graph is stored in an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.graphs()
        for value in graph.initializers.values()
    )


def estimated_size_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, a lower bound of the serialised size."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def external_data_name(path: str | os.PathLike) -> str:
    """The external data file name bnfold writes beside ``path``: ``<file name>.data``."""
    return Path(path).name + ".data"


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    with stage_model(model, path, external_data=external_data) as staged:
        staged.commit()


def stage_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """Write ``model`` under a temporary directory beside ``path``; :meth:`StagedModel.commit` moves it in.

    ``external_data=None`` chooses: external data when the model already had external tensors or its
    tensors exceed the 2 GiB protobuf limit (file names: :func:`create_staging`). Tensors already on disk are
    copied byte for byte, never decoded; a self-contained model is streamed, never built as one protobuf
    (:mod:`bnfold.streaming`). The staged files can be used (verified, for instance) before they replace
    anything at ``path``. ``model`` is unchanged.
    """
    from bnfold.streaming import DataFile, write_model

    staged = create_staging(model, path, external_data=external_data)
    try:
        if staged.data_name is None:
            write_model(model, staged.path)
        else:
            data = DataFile(staged.data_path)
            try:
                write_model(model, staged.path, data)
            finally:
                data.close()
    except BaseException:
        staged.discard()
        raise
    return staged


def create_staging(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """An empty temporary directory beside ``path`` and the names ``model`` is to be written under there.

    The data file is ``<file name>.data``, or ``<file name>.<n>.data`` with the smallest ``n >= 1`` when that
    name is a file ``model`` still reads external data from (folding in place alternates between the two), so
    the output never replaces a data file the input reads.
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or estimated_size_bytes(model) >= PROTOBUF_LIMIT_BYTES
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    read = _external_files(model)
    data_name = superseded = None
    if external_data:
        data_name = _data_name_not_in(path, read)
        superseded = tuple(
            file for file in read if file.parent == path.parent.resolve() and _is_data_name_for(path, file.name)
        )
    staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory)
    return StagedModel(staging, path, data_name, superseded=superseded or ())


def _external_files(model: ir.Model) -> set[Path]:
    """Files ``model`` reads external data from, plus every file it was loaded from (even when folding dropped
    the last tensor that read one, an in-place save must not write into it before the model is renamed)."""
    loaded_from = {Path(file) for file in model.meta.get(SOURCE_FILES_META, ())}
    return loaded_from | {
        Path(os.path.realpath(value.const_value.path))
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


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


def files_size_bytes(path: str | os.PathLike, model: ir.Model | None = None) -> int:
    """Bytes of the model file plus the external data files it references (``<name>.data`` without ``model``)."""
    path = Path(path)
    total = path.stat().st_size
    files: set[Path] = set()
    if model is not None:
        files = _external_files(model)
    else:
        data = path.parent / external_data_name(path)
        if data.is_file():
            files.add(Path(os.path.realpath(data)))
    files.discard(Path(os.path.realpath(path)))  # a self-contained model read lazily refers to itself
    return total + sum(file.stat().st_size for file in files if file.is_file())


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


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
