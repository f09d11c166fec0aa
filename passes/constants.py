"""Which values are constant, and their data (plus each value's rank, see :mod:`bnfold.passes.ranks`).

A value is constant when it is

- an initializer that is not a graph input — or, in IR < 4 models, where every initializer is also listed as
  a graph input, any initializer (this is how Caffe2 and old PyTorch exported weights);
- the output of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``);
- the output of ``ConstantOfShape`` whose shape input is constant;
- the output of ``Identity`` of a constant.

Inside a model-local function body there are no initializers: weights are ``Constant`` nodes, and the
function's inputs are runtime values (a per-call-site specialisation can turn constant call arguments into
``Constant`` nodes, see :mod:`bnfold.passes.functions`). A ``Constant`` whose value refers to a function
attribute is not constant here.

A graph input that is not an initializer is a true runtime input and never constant. In IR >= 4 an
initializer that is also a graph input is only a default the caller may override, so it is not constant.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.ranks import RankResolver

_MAX_IDENTITY_CHAIN = 64


class ConstantResolver:
    """Resolves values to numpy arrays without copying (external tensors are memory-mapped)."""

    def __init__(self, model: ir.Model) -> None:
        self.initializer_inputs_are_constant = (model.ir_version or 0) < 4
        self._ranks = RankResolver(model)

    def rank(self, *values: ir.Value | None) -> int | None:
        """The rank of the first of ``values`` whose rank is recorded or can be inferred, else ``None``."""
        for value in values:
            rank = self._ranks.rank(value)
            if rank is not None:
                return rank
        return None

    def dtype(self, *values: ir.Value | None) -> ir.DataType | None:
        """The element type of the first of ``values`` whose type is recorded or can be inferred."""
        for value in values:
            dtype = self._ranks.dtype(value)
            if dtype is not None:
                return dtype
        return None

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's data, or ``None`` when it is not a compile-time constant."""
        for _ in range(_MAX_IDENTITY_CHAIN):
            if value is None:
                return None
            if value.is_initializer():
                if value.is_graph_input() and not self.initializer_inputs_are_constant:
                    return None
                return value.const_value.numpy() if value.const_value is not None else None
            if value.is_graph_input():
                return None
            producer = value.producer()
            if producer is None or producer.domain not in ("", "ai.onnx"):
                return None
            if producer.op_type == "Identity":
                value = producer.inputs[0] if producer.inputs else None
                continue
            if producer.op_type == "Constant":
                return _constant_node_array(producer)
            if producer.op_type == "ConstantOfShape":
                return self._constant_of_shape(producer)
            return None
        return None

    def is_constant(self, value: ir.Value | None) -> bool:
        return self.array(value) is not None

    def _constant_of_shape(self, node: ir.Node) -> np.ndarray | None:
        shape = self.array(node.inputs[0]) if node.inputs else None
        if shape is None or shape.ndim != 1 or shape.dtype.kind not in "iu" or np.any(shape < 0):
            return None
        if np.prod(shape, dtype=object) > 2**24 or np.any(shape > 2**24):  # no gigabytes from a few bytes
            return None
        fill = node.attributes.get("value")
        if fill is not None and (fill.is_ref() or fill.type != ir.AttributeType.TENSOR):
            return None
        fill_array = fill.as_tensor().numpy().reshape(-1) if fill is not None else np.zeros(1, np.float32)
        if fill_array.size != 1:
            return None
        return np.full(tuple(int(d) for d in shape), fill_array[0], dtype=fill_array.dtype)


def _constant_node_array(node: ir.Node) -> np.ndarray | None:
    attributes = node.attributes
    if any(attribute.is_ref() for attribute in attributes.values()):
        return None  # a function attribute: its value is only known per call site
    if "value" in attributes:
        return attributes["value"].as_tensor().numpy()
    if "value_float" in attributes:
        return np.array(attributes["value_float"].as_float(), dtype=np.float32)
    if "value_floats" in attributes:
        return np.array(list(attributes["value_floats"].as_floats()), dtype=np.float32)
    if "value_int" in attributes:
        return np.array(attributes["value_int"].as_int(), dtype=np.int64)
    if "value_ints" in attributes:
        return np.array(list(attributes["value_ints"].as_ints()), dtype=np.int64)
    return None
