"""Protobuf-level mutations of a :class:`~fuzz.seeds.Case`, driven by one ``random.Random``.

Each mutation edits the parsed ``ModelProto`` (or the side files) in place: node types and domains, node
inputs/outputs, attribute values and types, tensor shapes, dtypes and data, value infos, graph structure
(removal, duplication, reordering: dangling inputs, cycles, duplicate outputs), opsets and IR versions, and
external-data entries and files. A small share of cases is also mutated at the byte level after
serialisation. The same ``(case, seed)`` always gives the same mutant.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from fuzz.seeds import DATA_FILE, Case

OP_TYPES = (
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Gemm",
    "MatMul",
    "Relu",
    "Identity",
    "Constant",
    "ConstantOfShape",
    "Add",
    "If",
    "Loop",
    "Mystery",
    "",
)
DOMAINS = ("", "ai.onnx", "com.example", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training")
ATTRIBUTE_NAMES = (
    "group",
    "training_mode",
    "is_test",
    "spatial",
    "epsilon",
    "momentum",
    "transA",
    "transB",
    "alpha",
    "beta",
    "kernel_shape",
    "pads",
    "strides",
    "dilations",
    "auto_pad",
    "output_padding",
    "output_shape",
    "value",
    "consumed_inputs",
)
INTERESTING_INTS = (0, 1, -1, 2, 3, 4, 6, 7, 255, 2**31 - 1, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63))
INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 1e-38, 1e38, 3.4e38, float("nan"), float("inf"), float("-inf"))
INTERESTING_DIMS = (0, 1, 2, 3, 4, 5, 6, 8, -1, -(2**40), 2**31, 2**40, 2**62)
DATA_TYPES = (*range(0, 29), 99, -1)
OPSET_VERSIONS = (0, 1, 5, 6, 7, 8, 9, 13, 14, 15, 17, 21, 23, 24, 25, 26, 99, 2**31 - 1, 2**62)
IR_VERSIONS = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 99)
HOSTILE_LOCATIONS = (
    "/etc/passwd",
    "/tmp/bnfold-fuzz-absent",
    "../" + DATA_FILE,
    "sub/../../" + DATA_FILE,
    "sub/../" + DATA_FILE,
    "./" + DATA_FILE,
    "C:\\Windows\\x.data",
    "\\\\server\\share\\x",
    "model.onnx",
    "absent.data",
    "link.data",
    "dirlink/" + DATA_FILE,
    "a\x00b",
    "",
    "x" * 300,
    DATA_FILE,
)
HOSTILE_NUMBERS = ("-1", "abc", "", "1e3", "0x10", " 8", "99999999999999999999", str(2**63), "0", "4", "12", "64")
SYMLINKS = (
    ("link.data", "/etc/hostname"),
    ("link.data", "../outside.data"),
    ("link.data", DATA_FILE),
    ("dirlink", ".."),
    ("dirlink", "/"),
)


def graphs_of(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), depth first."""

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    yield from walk(attribute.g)
                for subgraph in attribute.graphs:
                    yield from walk(subgraph)

    yield from walk(model.graph)


def nodes_of(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for graph in graphs_of(model) for node in graph.node] + [
        node for function in model.functions for node in function.node
    ]


def tensors_of(model: onnx.ModelProto) -> list[TensorProto]:
    """Initializers of every graph and tensors held by Constant-like attributes."""
    tensors = [tensor for graph in graphs_of(model) for tensor in graph.initializer]
    for node in nodes_of(model):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
    return tensors


def names_of(model: onnx.ModelProto) -> list[str]:
    names = set()
    for graph in graphs_of(model):
        names.update(value.name for value in graph.input)
        names.update(value.name for value in graph.output)
        names.update(tensor.name for tensor in graph.initializer)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
    return sorted(names)


class Mutant:
    """A case under mutation: the parsed model, its side files and symlinks."""

    def __init__(self, case: Case) -> None:
        self.model = onnx.ModelProto()
        self.model.ParseFromString(case.model_bytes)
        self.files = dict(case.files)
        self.links = dict(case.links)

    def to_case(self) -> Case:
        return Case(
            self.model.SerializeToString(), tuple(sorted(self.files.items())), tuple(sorted(self.links.items()))
        )


# --- node mutations ---------------------------------------------------------------------------------------


def mutate_op_type(m: Mutant, rng: random.Random) -> None:
    nodes = nodes_of(m.model)
    if nodes:
        rng.choice(nodes).op_type = rng.choice(OP_TYPES)


def mutate_domain(m: Mutant, rng: random.Random) -> None:
    nodes = nodes_of(m.model)
    if nodes:
        rng.choice(nodes).domain = rng.choice(DOMAINS)


def mutate_node_io(m: Mutant, rng: random.Random) -> None:
    """Rewire one input/output: to another name (cycles, duplicate producers), to '', to a dangling name."""
    nodes = nodes_of(m.model)
    if not nodes:
        return
    node = rng.choice(nodes)
    field = node.input if rng.random() < 0.6 else node.output
    names = names_of(m.model) or ["x"]
    choice = rng.randrange(5)
    if choice == 0 and len(field):
        del field[rng.randrange(len(field))]
    elif choice == 1:
        field.append(rng.choice([*names, "", "dangling"]))
    elif len(field):
        field[rng.randrange(len(field))] = rng.choice([*names, "", "dangling"])


def _random_attribute(name: str, rng: random.Random) -> AttributeProto:
    kind = rng.choice(("int", "float", "ints", "floats", "string", "tensor", "empty"))
    attribute = AttributeProto(name=name)
    if kind == "int":
        attribute.type, attribute.i = AttributeProto.INT, rng.choice(INTERESTING_INTS)
    elif kind == "float":
        attribute.type, attribute.f = AttributeProto.FLOAT, rng.choice(INTERESTING_FLOATS)
    elif kind == "ints":
        attribute.type = AttributeProto.INTS
        attribute.ints.extend(rng.choice(INTERESTING_INTS) for _ in range(rng.randrange(0, 7)))
    elif kind == "floats":
        attribute.type = AttributeProto.FLOATS
        attribute.floats.extend(rng.choice(INTERESTING_FLOATS) for _ in range(rng.randrange(0, 4)))
    elif kind == "string":
        attribute.type, attribute.s = AttributeProto.STRING, rng.choice((b"NOTSET", b"SAME_UPPER", b"VALID", b"\xff"))
    elif kind == "tensor":
        attribute.type = AttributeProto.TENSOR
        attribute.t.CopyFrom(onnx.numpy_helper.from_array(np.ones(3, np.float32), name=name))
    else:
        attribute.type = rng.choice((AttributeProto.UNDEFINED, AttributeProto.GRAPH, AttributeProto.TENSORS))
    return attribute


def mutate_attribute_value(m: Mutant, rng: random.Random) -> None:
    """Change an attribute's value, keeping its declared type."""
    attributes = [a for node in nodes_of(m.model) for a in node.attribute]
    if not attributes:
        return
    attribute = rng.choice(attributes)
    if attribute.type == AttributeProto.INT:
        attribute.i = rng.choice(INTERESTING_INTS)
    elif attribute.type == AttributeProto.FLOAT:
        attribute.f = rng.choice(INTERESTING_FLOATS)
    elif attribute.type == AttributeProto.INTS:
        values = list(attribute.ints)
        if values and rng.random() < 0.5:
            values[rng.randrange(len(values))] = rng.choice(INTERESTING_INTS)
        elif values and rng.random() < 0.5:
            values.pop()
        else:
            values.append(rng.choice(INTERESTING_INTS))
        del attribute.ints[:]
        attribute.ints.extend(values)
    elif attribute.type == AttributeProto.TENSOR:
        _mutate_tensor(attribute.t, m, rng)


def mutate_attribute_type(m: Mutant, rng: random.Random) -> None:
    """Replace an attribute with one of the same name but a random type (e.g. ``group`` as a float)."""
    nodes = [node for node in nodes_of(m.model) if node.attribute]
    if not nodes:
        return
    node = rng.choice(nodes)
    index = rng.randrange(len(node.attribute))
    replacement = _random_attribute(node.attribute[index].name, rng)
    node.attribute[index].CopyFrom(replacement)


def mutate_attribute_set(m: Mutant, rng: random.Random) -> None:
    """Add a random attribute (maybe a duplicate name) or delete one."""
    nodes = nodes_of(m.model)
    if not nodes:
        return
    node = rng.choice(nodes)
    if node.attribute and rng.random() < 0.4:
        del node.attribute[rng.randrange(len(node.attribute))]
    else:
        node.attribute.append(_random_attribute(rng.choice(ATTRIBUTE_NAMES), rng))


# --- tensor mutations -------------------------------------------------------------------------------------


def _fill_pattern(rng: random.Random) -> bytes:
    return rng.choice(
        (
            struct.pack("<f", float("nan")),
            struct.pack("<f", float("inf")),
            struct.pack("<f", 3.4e38),
            struct.pack("<f", -1.0),
            struct.pack("<f", 1e-45),
            struct.pack("<e", 65504.0),
            struct.pack("<d", 1e308),
            b"\x00",
            b"\xff",
        )
    )


def _mutate_tensor(tensor: TensorProto, m: Mutant, rng: random.Random) -> None:
    choice = rng.randrange(8)
    if choice == 0:  # dims
        dims = list(tensor.dims)
        action = rng.randrange(3)
        if action == 0 and dims:
            dims[rng.randrange(len(dims))] = rng.choice(INTERESTING_DIMS)
        elif action == 1 and dims:
            dims.pop(rng.randrange(len(dims)))
        else:
            dims.insert(rng.randrange(len(dims) + 1), rng.choice(INTERESTING_DIMS))
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif choice == 1:
        tensor.data_type = rng.choice(DATA_TYPES)
    elif choice == 2 and tensor.raw_data:  # flip bytes
        data = bytearray(tensor.raw_data)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        tensor.raw_data = bytes(data)
    elif choice == 3 and tensor.raw_data:  # truncate or extend
        data = tensor.raw_data
        tensor.raw_data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + data[: rng.randrange(9)]
    elif choice == 4 and tensor.raw_data:  # extreme values
        pattern = _fill_pattern(rng)
        tensor.raw_data = (pattern * (len(tensor.raw_data) // len(pattern) + 1))[: len(tensor.raw_data)]
    elif choice == 5 and tensor.raw_data:  # raw_data → typed field
        count = len(tensor.raw_data) // 4
        values = struct.unpack(f"<{count}f", tensor.raw_data[: 4 * count])
        tensor.ClearField("raw_data")
        tensor.float_data.extend(values)
    elif choice == 6:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.ClearField("int64_data")
    else:
        _mutate_external(tensor, m, rng)


def mutate_tensor(m: Mutant, rng: random.Random) -> None:
    tensors = tensors_of(m.model)
    if tensors:
        _mutate_tensor(rng.choice(tensors), m, rng)


EXTREME_VALUES = (0.0, -0.0, 1e-45, 1e-12, -1e-6, 1e-3, 65504.0, 65520.0, 1e30, 3.4e38, -3.4e38, 1e300, -1.0)
CONSISTENT_DTYPES = (np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int32, np.int64, np.int8)


def mutate_tensor_consistently(m: Mutant, rng: random.Random) -> None:
    """Rewrite a tensor so that it stays well-formed: new values (extreme ones included), dtype or shape."""
    tensors = [t for t in tensors_of(m.model) if t.data_location != TensorProto.EXTERNAL]
    if not tensors:
        return
    tensor = rng.choice(tensors)
    try:
        array = numpy_helper.to_array(tensor)
    except Exception:
        return
    choice = rng.randrange(3)
    values_rng = np.random.default_rng(rng.randrange(2**32))
    if choice == 0 and array.size and array.dtype.kind == "f":
        extreme = rng.choice(EXTREME_VALUES)
        mask = values_rng.random(array.shape) < rng.choice((0.2, 1.0))
        with np.errstate(all="ignore"):
            array = np.where(mask, np.asarray(extreme).astype(array.dtype), array)
    elif choice == 1:
        with np.errstate(all="ignore"):
            array = array.astype(rng.choice(CONSISTENT_DTYPES))
    else:
        shape = [rng.choice((0, 1, 2, 3, 4, 6)) for _ in range(rng.randrange(0, 5))]
        array = (values_rng.standard_normal(shape) * 2).astype(array.dtype if array.dtype.kind == "f" else np.float32)
    replacement = numpy_helper.from_array(np.ascontiguousarray(array), name=tensor.name)
    tensor.CopyFrom(replacement)


def _set_entry(tensor: TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value


def _mutate_external(tensor: TensorProto, m: Mutant, rng: random.Random) -> None:
    """Edit external-data entries, or move an inline tensor to (a possibly hostile) external location."""
    choice = rng.randrange(7)
    if choice == 0:
        _set_entry(tensor, "location", rng.choice(HOSTILE_LOCATIONS))
    elif choice == 1:
        _set_entry(tensor, rng.choice(("offset", "length")), rng.choice(HOSTILE_NUMBERS))
    elif choice == 2 and tensor.external_data:
        del tensor.external_data[rng.randrange(len(tensor.external_data))]
    elif choice == 3:
        tensor.data_location = rng.choice((TensorProto.DEFAULT, TensorProto.EXTERNAL))
    elif choice == 4:
        entry = tensor.external_data.add()
        entry.key, entry.value = rng.choice(("location", "offset", "checksum", "junk")), rng.choice(HOSTILE_NUMBERS)
    elif choice == 5:  # externalise an inline tensor
        raw = tensor.raw_data
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        data = m.files.get(DATA_FILE, b"")
        _set_entry(tensor, "location", DATA_FILE)
        _set_entry(tensor, "offset", str(len(data)))
        _set_entry(tensor, "length", str(len(raw)))
        m.files[DATA_FILE] = data + raw
    else:
        name, target = rng.choice(SYMLINKS)
        m.links[name] = target
        _set_entry(tensor, "location", name if name != "dirlink" else "dirlink/" + DATA_FILE)


def mutate_data_file(m: Mutant, rng: random.Random) -> None:
    """Truncate, extend, corrupt or remove a side file; or add an ``outside.data`` next to nothing."""
    if not m.files:
        m.files["outside.data"] = bytes(64)
        return
    name = rng.choice(sorted(m.files))
    data = m.files[name]
    choice = rng.randrange(4)
    if choice == 0:
        m.files[name] = data[: rng.randrange(len(data) + 1)]
    elif choice == 1:
        m.files[name] = data + bytes(rng.randrange(1, 64))
    elif choice == 2 and data:
        pattern = _fill_pattern(rng)
        m.files[name] = (pattern * (len(data) // len(pattern) + 1))[: len(data)]
    else:
        del m.files[name]


# --- graph mutations --------------------------------------------------------------------------------------


def mutate_value_info(m: Mutant, rng: random.Random) -> None:
    """Graph input/output/value_info: dims, element type, removal, duplication."""
    graph = rng.choice(list(graphs_of(m.model)))
    field = rng.choice((graph.input, graph.output, graph.value_info))
    if not len(field):
        return
    value = field[rng.randrange(len(field))]
    choice = rng.randrange(5)
    tensor_type = value.type.tensor_type
    if choice == 0 and tensor_type.shape.dim:
        dim = tensor_type.shape.dim[rng.randrange(len(tensor_type.shape.dim))]
        if rng.random() < 0.8:
            dim.dim_value = rng.choice(INTERESTING_DIMS)
        else:
            dim.dim_param = rng.choice(("N", "", "?", "x" * 100))
    elif choice == 1:
        tensor_type.elem_type = rng.choice(DATA_TYPES)
    elif choice == 2:
        field.remove(value)
    elif choice == 3:
        field.add().CopyFrom(value)
    else:
        value.ClearField("type")


def mutate_graph_structure(m: Mutant, rng: random.Random) -> None:
    """Remove, duplicate or reorder nodes; remove, duplicate or rename initializers."""
    graph = rng.choice(list(graphs_of(m.model)))
    choice = rng.randrange(7)
    nodes = graph.node
    if choice == 0 and len(nodes):
        del nodes[rng.randrange(len(nodes))]
    elif choice == 1 and len(nodes):
        nodes.add().CopyFrom(nodes[rng.randrange(len(nodes))])
    elif choice == 2 and len(nodes) > 1:
        order = [onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes]
        rng.shuffle(order)
        del nodes[:]
        nodes.extend(order)
    elif choice == 3 and len(graph.initializer):
        del graph.initializer[rng.randrange(len(graph.initializer))]
    elif choice == 4 and len(graph.initializer):
        graph.initializer.add().CopyFrom(graph.initializer[rng.randrange(len(graph.initializer))])
    elif choice == 5 and len(graph.initializer):
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        tensor.name = rng.choice([*names_of(m.model), ""])
    elif len(graph.initializer):  # an initializer that is also a graph input
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def mutate_opset(m: Mutant, rng: random.Random) -> None:
    choice = rng.randrange(4)
    if choice == 0 and len(m.model.opset_import):
        m.model.opset_import[rng.randrange(len(m.model.opset_import))].version = rng.choice(OPSET_VERSIONS)
    elif choice == 1:
        m.model.ir_version = rng.choice(IR_VERSIONS)
    elif choice == 2 and len(m.model.opset_import):
        del m.model.opset_import[rng.randrange(len(m.model.opset_import))]
    else:
        m.model.opset_import.add().CopyFrom(onnx.helper.make_opsetid(rng.choice(DOMAINS), rng.choice(OPSET_VERSIONS)))


def mutate_constant_feed(m: Mutant, rng: random.Random) -> None:
    """Feed a node input from a Constant, Identity or ConstantOfShape (maybe huge) instead of an initializer."""
    graph = rng.choice(list(graphs_of(m.model)))
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = [(node, i) for node in graph.node for i, name in enumerate(node.input) if name in initializers]
    if not readers:
        return
    node, index = rng.choice(readers)
    tensor = initializers[node.input[index]]
    fed = f"{tensor.name}_fed{len(graph.node)}"
    choice = rng.randrange(3)
    if choice == 0:
        feeder = onnx.helper.make_node("Constant", [], [fed], value=tensor)
    elif choice == 1:
        feeder = onnx.helper.make_node("Identity", [tensor.name], [fed])
    else:
        dims = [rng.choice((*INTERESTING_DIMS, *tensor.dims)) for _ in range(rng.randrange(1, 3))]
        shape_name = f"{fed}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(dims, dtype=np.int64), shape_name))
        fill = numpy_helper.from_array(np.array([rng.choice(EXTREME_VALUES)], dtype=np.float32), "fill")
        feeder = onnx.helper.make_node("ConstantOfShape", [shape_name], [fed], value=fill)
    graph.node.insert(0, feeder)
    node.input[index] = fed


def mutate_function(m: Mutant, rng: random.Random) -> None:
    """Add a model-local function holding a Conv → BN, called from the main graph, or drop one."""
    if m.model.functions and rng.random() < 0.3:
        del m.model.functions[rng.randrange(len(m.model.functions))]
        return
    function = onnx.helper.make_function(
        "local",
        f"F{len(m.model.functions)}",
        ["x", "w", "g", "b", "mu", "v"],
        ["y"],
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"]),
            onnx.helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "v"], ["y"]),
        ],
        [onnx.helper.make_opsetid("", 17)],
    )
    m.model.functions.append(function)
    if not any(o.domain == "local" for o in m.model.opset_import):
        m.model.opset_import.append(onnx.helper.make_opsetid("local", 1))
    names = names_of(m.model) or ["x"]
    call = onnx.helper.make_node(function.name, [rng.choice(names) for _ in range(6)], ["fn_out"], domain="local")
    m.model.graph.node.append(call)


MUTATIONS: tuple[Callable[[Mutant, random.Random], None], ...] = (
    mutate_op_type,
    mutate_domain,
    mutate_node_io,
    mutate_node_io,
    mutate_attribute_value,
    mutate_attribute_value,
    mutate_attribute_type,
    mutate_attribute_set,
    mutate_tensor,
    mutate_tensor,
    mutate_tensor_consistently,
    mutate_tensor_consistently,
    mutate_tensor_consistently,
    mutate_data_file,
    mutate_value_info,
    mutate_graph_structure,
    mutate_graph_structure,
    mutate_opset,
    mutate_function,
    mutate_constant_feed,
    mutate_constant_feed,
)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Byte-level damage to a serialised model: flips, truncation, insertion."""
    buffer = bytearray(data)
    choice = rng.randrange(3)
    if choice == 0 and buffer:
        for _ in range(rng.randrange(1, 8)):
            buffer[rng.randrange(len(buffer))] = rng.randrange(256)
    elif choice == 1 and buffer:
        del buffer[rng.randrange(len(buffer)) :]
    else:
        position = rng.randrange(len(buffer) + 1)
        buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(buffer)


def mutate(case: Case, rng: random.Random, *, max_mutations: int = 4, byte_level_share: float = 0.05) -> Case:
    """One mutant of ``case``: 1..``max_mutations`` structured mutations, sometimes byte-level damage after."""
    mutant = Mutant(case)
    for _ in range(rng.randint(1, max_mutations)):
        rng.choice(MUTATIONS)(mutant, rng)
    result = mutant.to_case()
    if rng.random() < byte_level_share:
        result = Case(mutate_bytes(result.model_bytes, rng), result.files, result.links)
    return result
