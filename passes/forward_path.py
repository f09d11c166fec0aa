"""Look through the nodes between a BatchNormalization and the layer it folds forward into.

A forward fold (:mod:`~bnfold.passes.forward_conv`, :mod:`~bnfold.passes.forward_gemm`,
:mod:`~bnfold.passes.forward_matmul`) needs the layer to see BN's per-channel affine ``X' = X·s[c] + t[c]``
(axis 1, ``s``, ``t`` from :class:`~bnfold.passes.affine.Affine`) on the axis its weight contracts. Exports put
a few nodes in between that keep that true:

- ``Identity`` and a ``Dropout`` that is the identity (inference): ``f(X') = X'``;
- averaging over spatial axes — ``GlobalAveragePool``, or ``ReduceMean`` whose axes are all ``>= 2``
  (``keepdims`` either): the mean of ``X[n, c, ·]·s[c] + t[c]`` over any set of positions of one channel is
  ``mean(X[n, c, ·])·s[c] + t[c]``, so the affine commutes with it and axis 1 stays the channel axis (max
  pooling does not commute with a negative scale; padded average pooling averages in zeros that never saw
  the shift — neither is looked through);
- ``Flatten`` with ``axis = 1`` of ``[N, C, d...]``, and a ``Reshape`` that is exactly that flatten: row-major
  order makes feature ``k = c·R + r`` of ``[N, K]`` (``R = prod(d...) = K / C``) come from channel ``c``, so
  channel ``c`` owns the contiguous block ``c·R .. (c+1)·R − 1`` and the affine becomes per feature::

      s'[k] = s[k // R],  t'[k] = t[k // R]            (:func:`spread`)

  ``K`` is what the layer contracts (its weight's input size, :class:`TakesFlattenedInput`), so ``R`` needs no
  static shape: ``K`` must be a multiple of ``C`` (``PARAM_SHAPE_MISMATCH``), and at run time the layer only
  accepts ``K = C·R``.

Every node of the path keeps dimension 0 (the batch), reads the previous value at input 0, and its output must
be read by the next node alone; the fold removes the BN and lets the first path node read BN's input. Readers of
a path value's *shape* (``Shape``, ``Size``) or *element type* (``CastLike``'s input 1) do not count: neither the
BN nor the fold changes a shape or a type, and a ``Shape`` of BN's ``Y`` then reads BN's ``X``.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`; the driver checks the path's
readers and graphs):

- every path value but BN's own ``Y`` is read by the next node only (``FORWARD_PATH_BRANCHES``) and is not a
  graph output (``FORWARD_PATH_IS_GRAPH_OUTPUT``), when one of its readers could continue the fold;
- ``Dropout``: its mask output is not read; ``training_mode`` (opset >= 12) absent or a constant false;
  ``is_test = 1`` before opset 7 (``DROPOUT_NOT_INFERENCE``);
- ``Flatten``: ``axis`` is 1, or negative and 1 once the input rank is known (``FLATTEN_AXIS_NOT_CHANNEL``,
  ``RANK_UNKNOWN``);
- ``Reshape``: provably ``[N, C, d...] → [N, C·prod(d)]`` (``RESHAPE_NOT_FLATTEN``; the proof is in
  :mod:`~bnfold.passes.reshape_flatten`, which may read a batch size from any value from BN's input to the
  Reshape: they all keep dimension 0);
- ``ReduceMean``: axes constant (attribute before opset 18, input from 18), non-empty, all ``>= 2`` once
  negative axes are resolved with the input rank (``REDUCE_AXES_NOT_SPATIAL``, ``RANK_UNKNOWN``); with no axes
  and ``noop_with_empty_axes = 1`` it is the identity;
- a flattened path only into a layer that can take it (:class:`TakesFlattenedInput`; ``UNSUPPORTED_LAYOUT``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from bnfold.passes import reshape_flatten
from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.graph_edit import reads_only_metadata
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import int_attribute

PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "GlobalAveragePool", "ReduceMean"})
# Readers that see only a value's shape, which neither the BN nor the fold changes: they may read any path value.


@runtime_checkable
class TakesFlattenedInput(Protocol):
    """A forward rule whose layer contracts a flattened ``[N, K]`` input (Gemm, MatMul; not Conv)."""

    def input_features(self, consumer: ir.Node, constants: ConstantResolver) -> int:
        """``K``, the number of input features the layer's weight contracts; ``Skip`` when it cannot fold."""
        ...


@dataclasses.dataclass(frozen=True)
class ForwardPath:
    """The pass-through nodes after a BN, in order, and the value the last one emits (BN's ``Y`` if none)."""

    nodes: tuple[ir.Node, ...]
    end: ir.Value

    def describe(self) -> str:
        return ", ".join(f"{node.op_type} {node.name!r}" for node in self.nodes)


def is_pass_through(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in PASS_THROUGH_OPS


def data_readers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read ``value``'s data (every reader but those of :func:`reads_only_metadata`)."""
    return [use.node for use in value.uses() if not reads_only_metadata(use.node, use.idx)]


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value``'s data, at its input 0, when ``value`` is no graph output."""
    if value.is_graph_output():
        return None
    uses = [use for use in value.uses() if not reads_only_metadata(use.node, use.idx)]
    if len(uses) != 1 or uses[0].idx != 0:
        return None
    return uses[0].node


def follow(batch_norm: ir.Node) -> ForwardPath:
    """Walk from BN's ``Y`` through sole-reader pass-through nodes (structure only; :func:`check` judges them)."""
    nodes: list[ir.Node] = []
    value = batch_norm.outputs[0]
    reader = sole_reader(value)
    while reader is not None and is_pass_through(reader) and reader.outputs:
        nodes.append(reader)
        value = reader.outputs[0]
        reader = sole_reader(value)
    return ForwardPath(tuple(nodes), value)


def check(path: ForwardPath, opset: int, constants: ConstantResolver) -> bool:
    """``Skip`` unless every path node passes BN's affine on unchanged; ``True`` when the path flattens."""
    flattened = False
    for node in path.nodes:
        flattened = _CHECKS[node.op_type](node, opset, constants) or flattened
    return flattened


def spread(affine: Affine, features: int) -> Affine:
    """The per-feature affine of a flattened ``[N, features]`` input: each channel's block of ``K / C`` features."""
    channels = affine.channels
    if channels == 0 or features % channels:
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH,
            f"the layer contracts {features} flattened features, not a multiple of BN's {channels} channels",
        )
    block = features // channels
    return Affine(scale=np.repeat(affine.scale, block), shift=np.repeat(affine.shift, block))


def _identity(node: ir.Node, opset: int, constants: ConstantResolver) -> bool:
    return False


def _dropout(node: ir.Node, opset: int, constants: ConstantResolver) -> bool:
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        raise Skip(SkipReason.DROPOUT_NOT_INFERENCE, f"the mask output of Dropout {node.name!r} is read")
    if opset < 7:
        is_test = int_attribute(node, "is_test", 0)
        if is_test != 1:
            raise Skip(SkipReason.DROPOUT_NOT_INFERENCE, f"Dropout {node.name!r} has is_test={is_test} (training)")
        return False
    mode_value = node.inputs[2] if len(node.inputs) > 2 else None
    if mode_value is not None:
        mode = constants.array(mode_value)
        if mode is None:
            raise Skip(SkipReason.DROPOUT_NOT_INFERENCE, f"training_mode of Dropout {node.name!r} is not constant")
        if mode.size != 1 or bool(mode.reshape(-1)[0]):
            raise Skip(SkipReason.DROPOUT_NOT_INFERENCE, f"Dropout {node.name!r} runs in training mode")
    return False


def _flatten(node: ir.Node, opset: int, constants: ConstantResolver) -> bool:
    axis = int_attribute(node, "axis", 1)
    if axis < 0:
        rank = constants.rank(node.inputs[0])
        if rank is None:
            raise Skip(SkipReason.RANK_UNKNOWN, f"Flatten {node.name!r} has axis={axis} and an input of unknown rank")
        axis += rank
    if axis != 1:
        raise Skip(SkipReason.FLATTEN_AXIS_NOT_CHANNEL, f"Flatten {node.name!r} flattens from axis {axis}, not 1")
    return True


def _reduce_mean(node: ir.Node, opset: int, constants: ConstantResolver) -> bool:
    where = f"ReduceMean {node.name!r}"
    attribute = node.attributes.get("axes")
    if attribute is not None:
        axes = [int(axis) for axis in attribute.as_ints()]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constants.array(node.inputs[1])
        if array is None:
            raise Skip(SkipReason.REDUCE_AXES_NOT_SPATIAL, f"the axes of {where} are not constant")
        axes = [int(axis) for axis in array.reshape(-1)]
    else:
        axes = []
    if not axes:
        if int_attribute(node, "noop_with_empty_axes", 0):
            return False
        raise Skip(SkipReason.REDUCE_AXES_NOT_SPATIAL, f"{where} averages every axis, the channel axis too")
    if any(axis < 0 for axis in axes):
        rank = constants.rank(node.inputs[0])
        if rank is None:
            raise Skip(SkipReason.RANK_UNKNOWN, f"{where} has negative axes and an input of unknown rank")
        axes = [axis + rank if axis < 0 else axis for axis in axes]
    if any(axis < 2 for axis in axes):
        raise Skip(SkipReason.REDUCE_AXES_NOT_SPATIAL, f"{where} averages over axes {axes}, not only spatial ones")
    return False


def _reshape(node: ir.Node, opset: int, constants: ConstantResolver) -> bool:
    reshape_flatten.check_flatten(node, constants, _same_batch(node.inputs[0]))
    return True


def _same_batch(value: ir.Value) -> set[ir.Value]:
    """``value`` and the values before it through pass-through nodes and the BN: all have the same dimension 0."""
    values: set[ir.Value] = set()
    while value is not None and value not in values:
        values.add(value)
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            break
        if producer.op_type == "BatchNormalization":
            values.add(producer.inputs[0])
            break
        if producer.op_type not in PASS_THROUGH_OPS:
            break
        value = producer.inputs[0]
    return values


_CHECKS: dict[str, Callable[[ir.Node, int, ConstantResolver], bool]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "GlobalAveragePool": _identity,
    "ReduceMean": _reduce_mean,
}
