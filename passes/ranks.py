"""The rank and element type of a value: as recorded in the model, else from ONNX shape inference.

Some rules need the rank of a tensor the model does not annotate. For example, TorchScript exports a
bias-less ``Linear`` as a ``MatMul`` and records no shape on its output. When a recorded shape is missing,
ONNX shape inference runs **once** on a copy of the model that holds no weight data (initializers become
typed graph inputs), and its ranks are looked up by value name. The model itself is never changed: no
inferred shape is written back. ONNX inference leaves a ``Reshape(x, Shape(y))`` without a shape when it
cannot propagate the data of ``Shape(y)`` (at opset 13, LeViT's ``Reshape`` back to ``[B, N, C]`` before a
decomposed hardswish), and everything after it too; yet by the spec its rank is the length of its ``shape``
input. That rank is then added to the weightless copy and inference runs again (at most
:data:`MAX_RESHAPE_ROUNDS` times). Only values of the main graph and its subgraphs are looked up; function
bodies keep what they record.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

#: Rounds of "annotate Reshape ranks, infer again" (one per Reshape whose rank hangs on an earlier one).
MAX_RESHAPE_ROUNDS = 4


class RankResolver:
    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._graphs: frozenset[ir.Graph] | None = None
        self._inferred: dict[str, _Facts] | None = None

    def rank(self, value: ir.Value | None) -> int | None:
        """The value's rank, or ``None`` when neither the model nor shape inference knows it."""
        if value is None:
            return None
        if value.shape is not None:
            return len(value.shape)
        return self._lookup(value)[0]

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        """The value's element type, or ``None`` when neither the model nor shape inference knows it."""
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        return self._lookup(value)[1]

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        """The value's dimensions (``None`` for a dimension that is not a fixed number), or ``None`` when the rank
        is unknown. A recorded shape is used as is; when the model records none, shape inference's."""
        if value is None:
            return None
        if value.shape is not None:
            return tuple(dim if isinstance(dim, int) else None for dim in value.shape)
        return self._lookup(value)[2]

    def _lookup(self, value: ir.Value) -> _Facts:
        if not value.name or value.graph is None:
            return (None, None, None)
        if self._graphs is None:  # once: walking the model per lookup is quadratic on large graphs
            self._graphs = frozenset(self._model.graphs())
        if value.graph not in self._graphs:
            return (None, None, None)
        if self._inferred is None:
            self._inferred = _infer(self._model)
        return self._inferred.get(value.name, (None, None, None))


# What shape inference tells of one value: its rank, element type and dimensions (``None`` when not a number).
_Facts = tuple[int | None, ir.DataType | None, tuple[int | None, ...] | None]


def _infer(model: ir.Model) -> dict[str, _Facts]:
    weightless = model.clone()  # shares tensors; only the copy's graph structure is changed below
    graph = weightless.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is not None:
            if value.shape is None:
                value.shape = ir.Shape(tensor.shape)
            if value.dtype is None:
                value.dtype = tensor.dtype
        graph.initializers.pop(name)
        if not value.is_graph_input():
            graph.inputs.append(value)
    try:
        proto = ir.to_proto(weightless)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        for _ in range(MAX_RESHAPE_ROUNDS):
            if not _annotate_reshape_ranks(inferred.graph):
                break
            inferred = onnx.shape_inference.infer_shapes(inferred, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # best effort: a model that cannot be serialised or inferred just has unknown ranks
        return {}
    facts: dict[str, _Facts] = {}
    _collect(inferred.graph, facts)
    return facts


def _annotate_reshape_ranks(graph: onnx.GraphProto) -> bool:
    """Give each main-graph ``Reshape`` output that inference left without a shape the rank its spec implies —
    the length of its ``shape`` input, when that input's own shape is a known ``[k]`` — as a value_info of ``k``
    unknown dimensions; ``True`` when one was added (inference then runs again from there)."""
    typed = {value.name: value for value in [*graph.input, *graph.output, *graph.value_info]}
    added = False
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        output = typed.get(node.output[0]) if node.output else None
        if output is not None and output.type.tensor_type.HasField("shape"):
            continue
        shape_input, data = typed.get(node.input[1]), typed.get(node.input[0])
        if shape_input is None or not shape_input.type.tensor_type.HasField("shape"):
            continue
        dims = shape_input.type.tensor_type.shape.dim
        if len(dims) != 1 or not dims[0].HasField("dim_value"):
            continue
        elem_type = data.type.tensor_type.elem_type if data is not None else 0
        annotation = onnx.helper.make_tensor_value_info(node.output[0], elem_type, [None] * dims[0].dim_value)
        if output is None:
            graph.value_info.append(annotation)
        else:
            output.CopyFrom(annotation)
        added = True
    return added


def _collect(graph: onnx.GraphProto, facts: dict[str, _Facts]) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim)
        dtype = ir.DataType(tensor_type.elem_type) if tensor_type.elem_type else None
        facts.setdefault(value.name, (None if dims is None else len(dims), dtype, dims))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _collect(attribute.g, facts)
            for subgraph in attribute.graphs:
                _collect(subgraph, facts)
