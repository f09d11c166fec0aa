"""The rank and element type of a value: as recorded in the model, else from ONNX shape inference.

Some rules need the rank of a tensor the model does not annotate. For example, TorchScript exports a
bias-less ``Linear`` as a ``MatMul`` and records no shape on its output. When a recorded shape is missing,
ONNX shape inference runs **once** on a copy of the model that holds no weight data (initializers become
typed graph inputs), and its ranks are looked up by value name. The model itself is never changed: no
inferred shape is written back. Only values of the main graph and its subgraphs are looked up; function
bodies keep what they record.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir


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
    except Exception:  # best effort: a model that cannot be serialised or inferred just has unknown ranks
        return {}
    facts: dict[str, _Facts] = {}
    _collect(inferred.graph, facts)
    return facts


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
