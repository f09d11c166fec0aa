"""The rule contract: what a fold rule is, what it returns, and the small helpers rules share.

A rule inspects its producer node and answers either :class:`~bnfold.passes.reasons.Skip` or a
:class:`FoldPlan`: the producer inputs to replace, with their new values computed in float64. The driver
casts every planned tensor once (:func:`bnfold.passes.casting.cast_checked`) before it changes anything, so an
overflow in one tensor leaves the whole graph untouched.

Two kinds of rules exist:

- :class:`FoldRule` folds a BN into the node that *produces* its input (``Conv → BN``);
- :class:`ForwardFoldRule` folds a BN into the node that *consumes* its output (``BN → Conv``).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason

FOLDABLE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass(frozen=True)
class TensorUpdate:
    """Replace input ``input_index`` of ``node`` with the planned tensor, stored as ``dtype``.

    The planned tensor is ``values`` (float64), or, when ``row_scale`` is given, the float64 product
    ``values · row_scale`` (numpy broadcasting; ``row_scale`` is float64). The product is left to the driver,
    which computes it block by block while casting (:func:`~bnfold.passes.casting.cast_checked`), so a large
    weight never exists as a whole float64 array; :meth:`planned` materialises it.
    """

    node: ir.Node
    input_index: int
    values: np.ndarray
    dtype: ir.DataType
    name_hint: str
    row_scale: np.ndarray | None = None

    def planned(self) -> np.ndarray:
        """The planned tensor in float64."""
        if self.row_scale is None:
            return self.values
        return np.multiply(self.values, self.row_scale, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class AttributeUpdate:
    """Set ``attribute`` on ``node`` (replacing any attribute of the same name)."""

    node: ir.Node
    attribute: ir.Attr


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """What to change so that the neighbour computes ``BN(neighbour(x))`` (or ``neighbour(BN(x))``).

    Attributes:
        updates: neighbour inputs to replace (float64 values, cast once by the driver).
        attributes: neighbour attributes to set (Gemm's ``beta``).
        residual_shift: a per-channel float64 shift ``[C]`` the neighbour cannot absorb (MatMul has no bias);
            the driver adds it on the channel axis, rewriting the ``Add`` that follows the producer or replacing
            the BN by a new ``Add``.
        residual_dtype: the dtype the residual shift is stored in.
    """

    updates: tuple[TensorUpdate, ...]
    attributes: tuple[AttributeUpdate, ...] = ()
    residual_shift: np.ndarray | None = None
    residual_dtype: ir.DataType | None = None


class FoldRule(Protocol):
    """One producer op folded with a BN that follows it. Implementations live one per file."""

    name: str
    op_type: str

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        """The rank of the producer's output (from its weight, recorded shapes or ``constants.rank``), else ``None``.

        The driver needs it to decide whether the constant of ``producer → Add(constant) → BN`` is per channel.
        """
        ...

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        """Return the producer inputs to rewrite, or raise ``Skip`` with the reason it cannot fold."""
        ...


@runtime_checkable
class ForwardFoldRule(Protocol):
    """One consumer op that absorbs a BN in front of it (``BN → op``). ``op_type`` is the consumer's op."""

    name: str
    op_type: str

    def plan_forward(self, consumer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        """Return the consumer inputs to rewrite (BN's output feeds input 0), or raise ``Skip``."""
        ...


def weight_dtype(value: ir.Value, array: np.ndarray) -> ir.DataType:
    """The ONNX dtype of a constant weight; raise ``Skip(UNSUPPORTED_DTYPE)`` unless it is a float type."""
    dtype = ir.DataType.from_numpy(array.dtype)
    if dtype not in FOLDABLE_DTYPES:
        raise Skip(SkipReason.UNSUPPORTED_DTYPE, f"weight {value.name!r} is {dtype.name}")
    return dtype


def channel_count_matches(affine: Affine, channels: int, producer: ir.Node) -> None:
    """``Skip(PARAM_SHAPE_MISMATCH)`` unless the BN has one parameter per producer output channel."""
    if affine.channels != channels:
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH,
            f"BN has {affine.channels} channels, {producer.op_type} {producer.name!r} outputs {channels}",
        )


def constant_input(producer: ir.Node, index: int, constants: ConstantResolver, reason: SkipReason) -> np.ndarray | None:
    """The constant at ``producer.inputs[index]``; ``None`` when the input is absent; ``Skip`` when dynamic."""
    if index >= len(producer.inputs) or producer.inputs[index] is None:
        return None
    array = constants.array(producer.inputs[index])
    if array is None and constants.is_overridable_input(producer.inputs[index]):
        detail = "an initializer also listed as a graph input, overridable at run time"
        raise Skip(
            SkipReason.WEIGHT_IS_GRAPH_INPUT,
            f"input {index} ({producer.inputs[index].name!r}) of {producer.op_type} is {detail}"
            " (freeze it with --freeze-initializer-inputs)",
        )
    if array is None:
        raise Skip(reason, f"input {index} ({producer.inputs[index].name!r}) of {producer.op_type} is not constant")
    return array


def int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.as_int())


def float_attribute(node: ir.Node, name: str, default: float) -> float:
    attribute = node.attributes.get(name)
    return default if attribute is None else float(attribute.as_float())


def attribute_reference(node: ir.Node) -> str | None:
    """The name of the first attribute of ``node`` that refers to a function attribute, if any."""
    for name, attribute in node.attributes.items():
        if attribute.is_ref():
            return name
    return None


def channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    """The shape ``[C, 1, ..., 1]`` that broadcasts a per-channel vector onto axis 1 of a rank-``rank`` tensor."""
    return (channels,) + (1,) * (rank - 2)
