"""Which values are constant, and their data (plus each value's rank, see :mod:`bnfold.passes.ranks`).

A value is constant when it is

- an initializer that is not a graph input — or, in IR < 4 models, where every initializer is also listed as
  a graph input, any initializer (this is how Caffe2 and old PyTorch exported weights);
- the output of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``);
- the output of one of the few ops :mod:`bnfold.passes.constant_eval` evaluates (``Identity``, ``Shape``,
  ``Cast``, ``CastLike``, ``Reshape``, ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Expand``, ``ConstantOfShape``,
  ``Transpose``)
  whose inputs are constant — what raw dynamo exports compute a bias-less Conv's zero bias with. Evaluation
  never changes the graph, goes at most :data:`MAX_DEPTH` nodes deep and is size-capped (see that module).
  Results are memoised per value (a model has thousands of values); an output of ``Constant``, ``Identity``
  and ``Transpose`` is looked up afresh. The writer rewrites in place only a constant whose one data reader is
  the node the fold updates: a layer (whose output is never evaluated), a ``Constant`` node (rewritten in
  place), or the ``Transpose`` whose source the through-reshape rule scales (``MatMul(X, Transpose(W₀))``
  folds into ``W₀``). So only those three ops can read a rewritten tensor; their outputs are never memoised
  (each is a view or a lookup, cheap to redo), and every memoised result stays true.

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

from bnfold.passes.constant_eval import ElementBudget, evaluate, is_evaluable
from bnfold.passes.ranks import RankResolver

#: The longest chain of evaluated nodes (Identity included) below a value; deeper is "not constant".
MAX_DEPTH = 64

#: Ops whose output is never memoised: cheap, and they may read a tensor the fold rewrites in place.
_UNMEMOISED = frozenset({"Constant", "Identity", "Transpose"})


class ConstantResolver:
    """Resolves values to numpy arrays without copying (external tensors are memory-mapped).

    Arrays are shared: a caller must not write into them.
    """

    def __init__(self, model: ir.Model) -> None:
        self.initializer_inputs_are_constant = (model.ir_version or 0) < 4
        self._ranks = RankResolver(model)
        self.budget = ElementBudget()
        self._memo: dict[ir.Value, np.ndarray | None] = {}
        self._depth = 0

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

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        """The value's dimensions as recorded or inferred (``None`` per dimension that is not a number), or
        ``None`` when its rank is unknown."""
        return self._ranks.shape(value)

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's data, or ``None`` when it is not a compile-time constant."""
        if value is None:
            return None
        if value.is_initializer():
            if value.is_graph_input() and not self.initializer_inputs_are_constant:
                return None  # an overridable default (:meth:`is_overridable_input`, inlined: read per BN input)
            return value.const_value.numpy() if value.const_value is not None else None
        if value.is_graph_input():
            return None
        producer = value.producer()
        if producer is None or not is_evaluable(producer):
            return None
        memoised = producer.op_type not in _UNMEMOISED
        if memoised and value in self._memo:
            return self._memo[value]
        if self._depth >= MAX_DEPTH:
            return None  # not memoised: from a shallower start the same value may evaluate
        self._depth += 1
        try:
            result = evaluate(producer, self)
        finally:
            self._depth -= 1
        if memoised:
            if result is not None:
                result.flags.writeable = False
            self._memo[value] = result
        return result

    def is_constant(self, value: ir.Value | None) -> bool:
        return self.array(value) is not None

    def is_overridable_input(self, value: ir.Value | None) -> bool:
        """Whether ``value`` is an initializer also listed as a graph input in an IR >= 4 model: a default the
        caller may override at run time, so not constant (see :mod:`bnfold.passes.freeze_initializer_inputs`)."""
        return (
            value is not None
            and value.is_initializer()
            and value.is_graph_input()
            and not self.initializer_inputs_are_constant
        )
