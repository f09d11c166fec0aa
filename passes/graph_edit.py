"""Safe graph edits for the fold: fresh names, tensor replacement without mutating shared data, BN removal.

- A planned tensor replaces an initializer *in place* (same name) only when that initializer is read by
  exactly this one node input and is not a graph output; otherwise a new initializer with a fresh name is
  created and only this node is rewired, so other readers keep the original tensor.
- The BN is bypassed by giving its ``Y`` name to the producer's output: downstream nodes, graph outputs and
  anyone comparing tensors by name see the same names as before.
- Values the edit leaves without readers (BN parameters, replaced Constant nodes) are removed, nothing else.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from bnfold.passes.rule import TensorUpdate


class NameAllocator:
    """Hands out value names that collide with no name anywhere in the model (graphs and functions)."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        graphs: list[ir.Graph | ir.Function] = [*model.graphs(), *model.functions.values()]
        for graph in graphs:
            self._taken.update(value.name for value in graph.inputs if value.name)
            self._taken.update(value.name for value in graph.outputs if value.name)
            if isinstance(graph, ir.Graph):
                self._taken.update(graph.initializers)
            for node in graph:
                self._taken.update(value.name for value in node.outputs if value.name)
                self._taken.update(value.name for value in node.inputs if value is not None and value.name)

    def fresh(self, hint: str) -> str:
        base = f"{hint}_bnfold" if hint else "bnfold"
        numbered = (f"{base}_{i}" for i in itertools.count(1))
        for candidate in itertools.chain([hint] if hint else [], [base], numbered):
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate
        raise AssertionError("unreachable")


class TensorWriter:
    """Applies :class:`TensorUpdate` s and remembers which values may have lost their last reader."""

    def __init__(self, model: ir.Model, names: NameAllocator) -> None:
        self._model = model
        self._names = names
        self._legacy_initializer_inputs = (model.ir_version or 0) < 4
        self.maybe_orphaned: list[ir.Value] = []

    def write(self, update: TensorUpdate, data: np.ndarray) -> None:
        node, index = update.node, update.input_index
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and self._solely_read_here(old, node, index):
            old.const_value = ir.tensor(data, name=old.name)
            old.shape = ir.Shape(data.shape)
            return
        new = ir.Value(
            name=self._names.fresh(update.name_hint),
            shape=ir.Shape(data.shape),
            type=ir.TensorType(update.dtype),
        )
        new.const_value = ir.tensor(data, name=new.name)
        graph = node.graph
        graph.register_initializer(new)
        if self._legacy_initializer_inputs and graph is self._model.graph:
            graph.inputs.append(new)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)
        if old is not None:
            self.maybe_orphaned.append(old)

    def _solely_read_here(self, value: ir.Value, node: ir.Node, index: int) -> bool:
        if not value.is_initializer() or value.is_graph_output() or value.graph is not node.graph:
            return False
        if value.is_graph_input() and not self._legacy_initializer_inputs:
            return False
        return [(use.node, use.idx) for use in value.uses()] == [(node, index)]

    def prune_orphans(self) -> None:
        """Remove initializers and constant-producing nodes that this edit left without readers."""
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
                graph.initializers.pop(value.name)
                continue
            producer = value.producer()
            if (
                producer is not None
                and producer.op_type in ("Constant", "Identity", "ConstantOfShape")
                and producer.domain in ("", "ai.onnx")
                and not any(output.uses() or output.is_graph_output() for output in producer.outputs)
            ):
                inputs = list(producer.inputs)
                producer.graph.remove(producer, safe=True)
                pending.extend(inputs)


def bypass_batch_norm(batch_norm: ir.Node) -> None:
    """Remove ``batch_norm`` and let its input carry its ``Y`` (name, type and shape kept)."""
    x, y = batch_norm.inputs[0], batch_norm.outputs[0]
    name, type_, shape = y.name, y.type, y.shape
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    batch_norm.graph.remove(batch_norm, safe=True)
    x.name = name
    if type_ is not None:
        x.type = type_
    if shape is not None:
        x.shape = shape
