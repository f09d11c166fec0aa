"""Checks that make a model file trustworthy before onnx_ir or any pass sees it.

:func:`check_model_proto` refuses protobufs that are not well-formed ONNX models; :func:`check_external_data`
refuses external-data references that escape the model's directory or point past their file. Both raise
:class:`~bnfold.errors.InvalidModelError` with a one-line reason naming the source (exit code 3).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, one_line

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
        nodes = list(function.node)
        defined, producer_of = _define_all(function.input, (), nodes, frozenset(), where)
        _check_nodes(nodes, defined, producer_of, frozenset(), function_opsets, where)
        _check_outputs(function.output, defined, frozenset(), where)


def _invalid_text_field(message) -> str | None:
    """The full name of a ``string`` field holding bytes that are not UTF-8 (protobuf hands those as bytes)."""
    for field, value in message.ListFields():
        is_string, is_message, repeated = _field_kinds.get(field) or _field_kind(field)
        if is_string:
            if bytes in map(type, value) if repeated else type(value) is bytes:
                return field.full_name
        elif is_message:
            for item in value if repeated else (value,):
                found = _invalid_text_field(item)
                if found is not None:
                    return found
    return None


_field_kinds: dict[object, tuple[bool, bool, bool]] = {}


def _field_kind(field) -> tuple[bool, bool, bool]:
    """(is a string, is a message, is repeated) of a protobuf field descriptor, computed once per descriptor."""
    kind = _field_kinds.get(field)
    if kind is None:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        kind = (field.type == field.TYPE_STRING, field.type == field.TYPE_MESSAGE, repeated)
        _field_kinds[field] = kind
    return kind


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


def _define_all(inputs, initializers, nodes, outer: frozenset[str], where: str) -> tuple[set[str], dict[str, int]]:
    """Every name the body defines, and the index of the node producing each node output.

    Refuses a name defined twice or shadowing an enclosing graph's value.
    """
    defined: set[str] = set()
    for value in inputs:
        name = value if isinstance(value, str) else value.name
        if name in defined:
            raise InvalidModelError(f"{where}: input {name!r} is declared twice")
        defined.add(name)
    seen_initializers: set[str] = set()
    for index, tensor in enumerate(initializers):
        name = tensor.name
        if not name:
            raise InvalidModelError(f"{where}: initializer #{index} has no name")
        if name in seen_initializers:
            raise InvalidModelError(f"{where}: initializer {name!r} is defined twice")
        seen_initializers.add(name)
        defined.add(name)  # an initializer may also be a graph input (its default)
    producer_of: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in defined:
                raise InvalidModelError(f"{where}: value {name!r} is produced twice (again by node {node.name!r})")
            if name in outer:
                raise InvalidModelError(f"{where}: node {node.name!r} output {name!r} shadows an outer value")
            defined.add(name)
            producer_of[name] = index
    return defined, producer_of


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], opsets: dict[str, int], where: str) -> None:
    initializers = list(graph.initializer)  # (one Python wrapper per message, shared by the walks below)
    for tensor in initializers:
        _check_tensor(tensor, f"{where}: tensor {tensor.name!r}")
    nodes = list(graph.node)
    defined, producer_of = _define_all(graph.input, initializers, nodes, outer, where)
    holders = _check_nodes(nodes, defined, producer_of, outer, opsets, where)
    _check_outputs(graph.output, defined, outer, where)
    _check_batch_norm_types(graph, initializers, nodes, opsets, where)
    visible = outer | defined
    for node in holders:
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


def _check_nodes(
    nodes: list[onnx.NodeProto],
    defined: set[str],
    producer_of: dict[str, int],
    outer: frozenset[str],
    opsets: dict[str, int],
    where: str,
) -> list[onnx.NodeProto]:
    """Check every node's reads, schema and tensor attributes, then that the nodes have no cycle.

    ``producer_of``: the index of the node producing each name. Returns the nodes that hold subgraphs (in
    order), for the caller to check those.
    """
    holders: list[onnx.NodeProto] = []
    in_order = True  # every node after the producers of what it reads: then there is no cycle
    for index, node in enumerate(nodes):
        inputs = node.input
        for name in inputs:
            if name and name not in defined and name not in outer:
                raise InvalidModelError(
                    f"{where}: node {node.name!r} ({node.op_type}) reads {name!r}, which nothing defines"
                )
            if producer_of.get(name, -1) >= index:
                in_order = False
        attributes = node.attribute
        _check_node_against_schema(node, inputs, attributes, opsets, where)
        holds_subgraph = False
        for attribute in attributes:
            if attribute.HasField("t"):
                _check_tensor(attribute.t, f"{where}: node {node.name!r} attribute {attribute.name!r}")
            for tensor in attribute.tensors:
                _check_tensor(tensor, f"{where}: node {node.name!r} attribute {attribute.name!r}")
            holds_subgraph = holds_subgraph or attribute.HasField("g") or bool(attribute.graphs)
        if holds_subgraph:
            holders.append(node)
            in_order = False  # (what its subgraphs read from this graph is left to Kahn's algorithm)
    if not in_order:
        _check_acyclic(nodes, producer_of, where)
    return holders


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


def _check_acyclic(nodes, producer_of: dict[str, int], where: str) -> None:
    """Kahn's algorithm over "reads a value produced by": refuse the body when some node never becomes ready.

    ``producer_of``: the index of the node producing each name. A node reads its inputs and, through its
    subgraphs, their free names.
    """
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


@dataclasses.dataclass(frozen=True)
class _SchemaSummary:
    """What :func:`_check_node_against_schema` needs from an ``OpSchema``, read once per (op, domain, version).

    ``onnx.defs.OpSchema``'s properties build new Python lists and dicts on every access, which cost more than
    the checks themselves on graphs of many small nodes.
    """

    inputs: tuple[int, int]  # min, max count
    outputs: tuple[int, int]
    required_inputs: tuple[str | None, ...]  # per formal: its name when it is a single (required) parameter
    required_outputs: tuple[str | None, ...]
    attribute_types: dict[str, tuple[int, str]]  # name → (AttributeProto type, its name)

    @classmethod
    def of(cls, schema: onnx.defs.OpSchema) -> _SchemaSummary:
        single = onnx.defs.OpSchema.FormalParameterOption.Single
        return cls(
            inputs=(schema.min_input, schema.max_input),
            outputs=(schema.min_output, schema.max_output),
            required_inputs=tuple(formal.name if formal.option == single else None for formal in schema.inputs),
            required_outputs=tuple(formal.name if formal.option == single else None for formal in schema.outputs),
            attribute_types={
                name: (int(declared.type.value), declared.type.name) for name, declared in schema.attributes.items()
            },
        )


_schema_cache: dict[tuple[str, str, int], _SchemaSummary | None] = {}


def _schema(op_type: str, domain: str, version: int) -> _SchemaSummary | None:
    key = (op_type, domain, min(version, _MAX_SCHEMA_VERSION))
    if key not in _schema_cache:
        try:
            _schema_cache[key] = _SchemaSummary.of(onnx.defs.get_schema(op_type, key[2], domain))
        except (onnx.defs.SchemaError, TypeError, ValueError):
            _schema_cache[key] = None
    return _schema_cache[key]


def _check_node_against_schema(node: onnx.NodeProto, inputs, attributes, opsets: dict[str, int], where: str) -> None:
    """Attribute names and types, input and output counts (``inputs``/``attributes``: the node's, read once)."""
    names: set[str] = set()
    for attribute in attributes:
        name = attribute.name
        if not name or name in names:
            raise InvalidModelError(f"{where}: node {node.name!r} has a nameless or repeated attribute")
        names.add(name)
        if attribute.type not in _VALID_ATTRIBUTE_TYPES:
            raise InvalidModelError(f"{where}: node {node.name!r} attribute {name!r} has no valid type")
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, 1 if domain == "" else None)  # no import: opset 1, as the fold pass assumes
    schema = _schema(node.op_type, domain, version) if version is not None and node.op_type else None
    if schema is None:
        return  # unknown op, custom domain or opset newer than this onnx: nothing to check against
    for kind, names, (low, high), required in (
        ("inputs", inputs, schema.inputs, schema.required_inputs),
        ("outputs", node.output, schema.outputs, schema.required_outputs),
    ):
        if not low <= len(names) <= high:
            raise InvalidModelError(
                f"{_node_label(node, version, where)} has {len(names)} {kind}, expected {low}..{high}"
            )
        # A required (single) input or output may not be left out with an empty name.
        for name, formal in zip(names, required, strict=False) if "" in names else ():
            if not name and formal is not None:
                raise InvalidModelError(
                    f"{_node_label(node, version, where)}: required {kind[:-1]} {formal!r} is empty"
                )
    for attribute in attributes:
        declared = schema.attribute_types.get(attribute.name)
        if declared is not None and not attribute.ref_attr_name and declared[0] != attribute.type:
            actual = onnx.AttributeProto.AttributeType.Name(attribute.type)
            raise InvalidModelError(
                f"{_node_label(node, version, where)} attribute {attribute.name!r} is {actual}, expected {declared[1]}"
            )


def _check_batch_norm_types(graph: onnx.GraphProto, initializers, nodes, opsets: dict[str, int], where: str) -> None:
    """BatchNormalization inputs of known element type must meet the schema's type constraints of the opset.

    Known: initializers, Constant values and typed graph inputs of this graph. Each such input's type must be
    allowed by its type parameter, and inputs sharing a parameter must share the type (opset < 14: all five
    share ``T``; 14: ``X``/scale/B share ``T``, mean/var ``U``; 15+: scale/B share ``T1``, mean/var ``T2``).
    onnxruntime refuses such a node; folding it would write a model nothing can run.
    """
    version = opsets.get("", 1)
    batch_norms = [node for node in nodes if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")]
    if not batch_norms:
        return
    constraints = _batch_norm_constraints(version)
    if constraints is None:
        return
    known = {
        value.name: value.type.tensor_type.elem_type for value in graph.input if value.type.HasField("tensor_type")
    }
    known.update({tensor.name: tensor.data_type for tensor in initializers})
    for node in nodes:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    known[node.output[0]] = attribute.t.data_type
    for node in batch_norms:
        shared: dict[str, tuple[str, str]] = {}  # type parameter → (input, its type)
        for name, (formal, param, allowed) in zip(node.input, constraints, strict=False):
            elem_type = known.get(name) if name else None
            if not elem_type:
                continue
            type_name = onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type in _DATA_TYPES else "unknown"
            label = _node_label(node, version, where)
            if f"tensor({type_name})" not in allowed:
                raise InvalidModelError(
                    f"{label}: input {formal} {name!r} is {type_name}, which {param} does not allow"
                )
            first = shared.setdefault(param, (formal, type_name))
            if first[1] != type_name:
                raise InvalidModelError(
                    f"{label}: input {formal} {name!r} is {type_name} but {first[0]} is {first[1]} "
                    f"(both are of type {param})"
                )


_batch_norm_cache: dict[int, tuple[tuple[str, str, frozenset[str]], ...] | None] = {}


def _batch_norm_constraints(version: int) -> tuple[tuple[str, str, frozenset[str]], ...] | None:
    """Per BatchNormalization input of opset ``version``: (formal name, type parameter, allowed type strings)."""
    if version not in _batch_norm_cache:
        try:
            schema = onnx.defs.get_schema("BatchNormalization", min(version, _MAX_SCHEMA_VERSION), "")
        except (onnx.defs.SchemaError, TypeError, ValueError):
            _batch_norm_cache[version] = None
        else:
            allowed = {item.type_param_str: frozenset(item.allowed_type_strs) for item in schema.type_constraints}
            _batch_norm_cache[version] = tuple(
                (formal.name, formal.type_str, allowed.get(formal.type_str, frozenset({formal.type_str})))
                for formal in schema.inputs
            )
    return _batch_norm_cache[version]


def _node_label(node: onnx.NodeProto, version: int, where: str) -> str:
    return f"{where}: node {node.name!r} ({node.op_type}, opset {version})"


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


_DATA_TYPES = {int(dtype): dtype for dtype in ir.DataType}


def tensor_dtype_and_size(tensor: onnx.TensorProto, where: str) -> tuple[ir.DataType, int]:
    """The tensor's data type and element count; refuse unknown types, negative dims and unrepresentable shapes.

    numpy refuses a shape whose non-zero dims need more than 2**63 bytes, even when another dim is 0.
    """
    dtype = _DATA_TYPES.get(tensor.data_type)
    if dtype is None:
        raise InvalidModelError(f"{where}: unknown data type {tensor.data_type}")
    if dtype == ir.DataType.UNDEFINED:
        raise InvalidModelError(f"{where}: data type is UNDEFINED")
    count, extent = 1, 16  # extent: bytes of the non-zero dims at 16 bytes per element (complex128, the widest)
    for dim in tensor.dims:
        if dim < 0:
            raise InvalidModelError(f"{where}: negative dimension in shape {list(tensor.dims)}")
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
        except (ValueError, TypeError, ir.serde.SerdeError) as error:  # (onnx_ir's words for malformed packing)
            raise InvalidModelError(f"{where}: malformed tensor data ({one_line(error)})") from error


def _entries_needed(dtype: ir.DataType, count: int) -> int:
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        return 2 * count
    if dtype != ir.DataType.STRING and dtype.bitwidth in (2, 4):
        return (count * dtype.bitwidth + 7) // 8  # packed: one int32 entry per byte
    return count


def iter_tensor_protos(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes of every graph, subgraph and function."""

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
    for tensor in iter_tensor_protos(proto):
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
