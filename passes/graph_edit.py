"""Safe graph edits for the fold: fresh names, tensor replacement without mutating shared data, BN removal.

- A planned tensor replaces an initializer (or, in a function body, a ``Constant`` node's value) *in place*,
  same name, only when that constant is read by exactly this one node input, lives in the same graph and is
  not a graph output;
  otherwise a new constant with a fresh name is created and only this node is rewired, so other readers
  (including nodes of an outer or inner graph) keep the original tensor.
- New constants are initializers of the graph holding the node; inside a function body (which cannot hold
  initializers) they are ``Constant`` nodes placed right before their first reader.
- The BN is bypassed by giving its ``Y`` name to the tensor that now carries its value: downstream nodes,
  graph outputs and anyone comparing tensors by name see the same names as before.
- Values the edit leaves without readers (BN parameters, replaced constants, the nodes that computed a
  replaced constant) are removed, nothing else.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from bnfold.passes.constant_eval import is_evaluable
from bnfold.passes.rule import TensorUpdate
from bnfold.passes.scopes import model_graphs


class NameAllocator:
    """Hands out value and node names that collide with no name anywhere in the model (graphs and functions)."""

    def __init__(self, model: ir.Model) -> None:
        taken: set[str | None] = set()
        taken_nodes: set[str | None] = set()
        for graph in [*model_graphs(model), *(g for f in model.functions.values() for g in (f.graph, *f.subgraphs()))]:
            nodes = list(graph)
            taken.update([value.name for value in graph.inputs])
            taken.update([value.name for value in graph.outputs])
            taken.update(graph.initializers)
            taken_nodes.update([node.name for node in nodes])
            taken.update([value.name for node in nodes for value in node.outputs])
            taken.update([value.name for node in nodes for value in node.inputs if value is not None])
        for names in (taken, taken_nodes):  # unnamed values and nodes take no name
            names.discard(None)
            names.discard("")
        self._taken: set[str] = taken
        self._taken_nodes: set[str] = taken_nodes

    def fresh(self, hint: str) -> str:
        return _fresh(hint, self._taken)

    def fresh_node(self, hint: str) -> str:
        return _fresh(hint, self._taken_nodes)


def _fresh(hint: str, taken: set[str]) -> str:
    if hint and hint not in taken:  # (the common case, without building the candidates)
        taken.add(hint)
        return hint
    base = f"{hint}_bnfold" if hint else "bnfold"
    numbered = (f"{base}_{i}" for i in itertools.count(1))
    for candidate in itertools.chain([hint] if hint else [], [base], numbered):
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise AssertionError("unreachable")


class TensorWriter:
    """Applies :class:`TensorUpdate` s, creates constants, and remembers values that may have lost their reader."""

    def __init__(self, model: ir.Model, names: NameAllocator) -> None:
        self._model = model
        self.names = names
        self._legacy_initializer_inputs = (model.ir_version or 0) < 4
        self._function_graphs: set[ir.Graph] = set()
        for function in model.functions.values():
            self.register_function(function)
        self.maybe_orphaned: list[ir.Value] = []

    def register_function(self, function: ir.Function) -> None:
        """Treat ``function``'s body (and its subgraphs) as initializer-free: new constants become nodes."""
        self._function_graphs.update((function.graph, *function.subgraphs()))

    def write(self, update: TensorUpdate, data: np.ndarray) -> None:
        node, index = update.node, update.input_index
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and self._solely_read_here(old, node, index, data, update.dtype):
            old.const_value = ir.Tensor(data, dtype=update.dtype, name=old.name)  # (ir.tensor checks cost ~7× more)
            old.shape = ir.Shape(data.shape)
            return
        if (
            node.graph in self._function_graphs
            and old is not None
            and self._constant_node_solely_read_here(old, node, index)
        ):
            constant = old.producer()
            for name in list(constant.attributes):
                del constant.attributes[name]
            tensor = ir.Tensor(data, dtype=update.dtype, name=old.name)
            constant.attributes["value"] = ir.Attr("value", ir.AttributeType.TENSOR, tensor)
            old.shape = ir.Shape(data.shape)
            old.type = ir.TensorType(update.dtype)
            return
        new = self.constant(node, data, update.dtype, update.name_hint)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)
        if old is not None:
            self.maybe_orphaned.append(old)

    def constant(self, reader: ir.Node, data: np.ndarray, dtype: ir.DataType, hint: str) -> ir.Value:
        """A new constant holding ``data`` (already of ``dtype``), visible to ``reader`` in its graph."""
        graph = reader.graph
        name = self.names.fresh(hint)
        tensor = ir.Tensor(data, dtype=dtype, name=name)
        if graph in self._function_graphs:
            node = ir.node("Constant", [], attributes={"value": tensor}, name=self.names.fresh_node(name))
            value = node.outputs[0]
            value.name = name
            value.shape = ir.Shape(data.shape)
            value.type = ir.TensorType(dtype)
            graph.insert_before(reader, node)
            return value
        value = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(dtype))
        value.const_value = tensor
        graph.register_initializer(value)
        if self._legacy_initializer_inputs and graph is self._model.graph:
            graph.inputs.append(value)
        return value

    def _solely_read_here(
        self, value: ir.Value, node: ir.Node, index: int, data: np.ndarray, dtype: ir.DataType
    ) -> bool:
        """``value`` is an initializer of ``node``'s graph whose only *data* reader is input ``index`` of ``node``.

        Readers of the shape or type only (:func:`reads_only_metadata`) do not count when the new tensor keeps
        the old shape and dtype (torch's raw dynamo export reads ``Shape(W)`` to build a Conv's zero bias): the folded
        weight then keeps its name.
        """
        if not value.is_initializer() or value.is_graph_output() or value.graph is not node.graph:
            return False
        if value.is_graph_input() and not self._legacy_initializer_inputs:
            return False
        uses = [(use.node, use.idx) for use in value.uses()]
        if not any(reads_only_metadata(reader, idx) for reader, idx in uses):  # (common: no layout to compare)
            return uses == [(node, index)]
        old = value.const_value
        same_layout = old is not None and tuple(old.shape) == data.shape and old.dtype == dtype
        readers = [(reader, idx) for reader, idx in uses if not (same_layout and reads_only_metadata(reader, idx))]
        return readers == [(node, index)]

    @staticmethod
    def _constant_node_solely_read_here(value: ir.Value, node: ir.Node, index: int) -> bool:
        producer = value.producer()
        return (
            producer is not None
            and producer.op_type == "Constant"
            and producer.domain in ("", "ai.onnx")
            and producer.graph is node.graph
            and not value.is_graph_output()
            and [(use.node, use.idx) for use in value.uses()] == [(node, index)]
        )

    def prune_orphans(self) -> None:
        """Remove initializers and constant-computing nodes that this edit left without readers.

        A node is removed only when it is one of the ops :mod:`~bnfold.passes.constant_eval` evaluates and none
        of its outputs has a reader or is a graph output; its inputs are then checked in turn, so a whole
        computed chain (raw dynamo's ``Expand(CastLike(0, X), Shape(W))`` bias) goes once the fold replaced
        it. Graph inputs, overridable initializers and nodes of other ops are never removed.
        """
        pending = list(self.maybe_orphaned)
        self.maybe_orphaned.clear()
        while pending:
            value = pending.pop()
            if value is None or value.uses() or value.is_graph_output():
                continue
            if value.is_initializer():
                graph = value.graph
                if value.is_graph_input():
                    if not self._legacy_initializer_inputs:
                        continue  # an overridable default is part of the interface: keep it
                    graph.inputs.remove(value)
                del graph.initializers[value.name]  # (not ``pop``: no lookup of the value it would return)
                continue
            producer = value.producer()
            if (
                producer is not None
                and producer.graph is not None  # not removed already: a value may be listed twice
                and is_evaluable(producer)  # a node computing a constant (Shape, Expand, CastLike, ...)
                and not any(output.uses() or output.is_graph_output() for output in producer.outputs)
            ):
                inputs = list(producer.inputs)
                producer.graph.remove(producer, safe=True)
                pending.extend(inputs)


def reads_only_metadata(node: ir.Node, index: int) -> bool:
    """Whether ``node``, reading a value at input ``index``, sees only its shape (``Shape``, ``Size``) or element
    type (``CastLike``'s input 1: raw dynamo's ``CastLike(1.0, conv_out)`` for a BN without affine parameters),
    which a fold keeps."""
    if node.domain not in ("", "ai.onnx"):
        return False
    return node.op_type in ("Shape", "Size") or (node.op_type == "CastLike" and index == 1)


def bypass(node: ir.Node, kept: ir.Value) -> None:
    """Remove single-output ``node`` and let ``kept`` carry its output (name, type and shape kept).

    ``kept`` must already compute what ``node``'s output computed (the fold moved the node's work elsewhere).
    """
    output = node.outputs[0]
    name, type_, shape = output.name, output.type, output.shape
    output.replace_all_uses_with(kept, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    kept.name = name
    if type_ is not None:
        kept.type = type_
    if shape is not None:
        kept.shape = shape


def bypass_batch_norm(batch_norm: ir.Node) -> None:
    """Remove ``batch_norm`` and let its input carry its ``Y`` (name, type and shape kept)."""
    bypass(batch_norm, batch_norm.inputs[0])


def replace_with_channel_affine(
    batch_norm: ir.Node, scale: ir.Value | None, shift: ir.Value, names: NameAllocator
) -> tuple[ir.Node, ...]:
    """Replace ``batch_norm`` by ``Add(X, shift)`` or ``Add(Mul(X, scale), shift)``; the Add emits ``Y``.

    ``scale``/``shift`` are constants shaped to broadcast onto axis 1 of ``X``. Returns the new nodes.
    """
    x, y = batch_norm.inputs[0], batch_norm.outputs[0]
    base = batch_norm.name or "batch_norm"
    nodes: list[ir.Node] = []
    if scale is not None:
        mul = ir.node("Mul", [x, scale], name=names.fresh_node(f"{base}_scale"))
        mul.outputs[0].name = names.fresh(f"{y.name}_scaled")
        mul.outputs[0].type, mul.outputs[0].shape = y.type, y.shape
        nodes.append(mul)
        x = mul.outputs[0]
    add = ir.node("Add", [x, shift], name=names.fresh_node(f"{base}_shift"))
    nodes.append(add)
    batch_norm.graph.insert_before(batch_norm, nodes)
    bypass(batch_norm, add.outputs[0])
    return tuple(nodes)


def remove_batch_norm_rewiring(batch_norm: ir.Node) -> None:
    """Remove ``batch_norm`` and let every reader of its ``Y`` read its ``X`` instead (``X`` keeps its name).

    For a forward fold: the first node after the BN now reads ``X``, and so does a node that reads only
    ``Y``'s shape (``Shape``, ``Size``; TorchScript's ``x.view(x.size(0), -1)``), which the BN does not change.
    ``Y`` must not be a graph output.
    """
    batch_norm.outputs[0].replace_all_uses_with(batch_norm.inputs[0])
    batch_norm.graph.remove(batch_norm, safe=True)


def remove_batch_norm_before(batch_norm: ir.Node, consumer: ir.Node) -> None:
    """Remove ``batch_norm`` whose only reader is input 0 of ``consumer``; ``consumer`` reads BN's ``X``."""
    consumer.replace_input_with(0, batch_norm.inputs[0])
    batch_norm.graph.remove(batch_norm, safe=True)


def add_after(node: ir.Node, shift: ir.Value, names: NameAllocator) -> ir.Node:
    """Insert ``Add(Y, shift)`` right after single-output ``node`` and let the Add emit ``Y`` in its stead.

    The Add takes over ``Y``'s name, type, shape, readers and graph-output slots; ``node``'s output gets a fresh
    name and is read by the Add alone. Used by a forward fold into a layer without a bias input (MatMul), whose
    shift must be added after it. Returns the new Add.
    """
    y = node.outputs[0]
    base = node.name or node.op_type
    add = ir.node("Add", [y, shift], name=names.fresh_node(f"{base}_shift"))
    node.graph.insert_after(node, add)
    shifted = add.outputs[0]
    y.replace_all_uses_with(shifted, replace_graph_outputs=True)
    add.replace_input_with(0, y)  # (the line above also moved the Add's own read of Y)
    name = y.name
    if name:
        y.name = names.fresh(f"{name}_unshifted")
        shifted.name = name
    shifted.type, shifted.shape = y.type, y.shape
    return add
