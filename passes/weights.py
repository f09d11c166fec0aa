"""What every weight-carrying rule checks before its math: a constant float weight and a per-channel bias.

Conv, ConvTranspose, Gemm, MatMul and the forward Conv rule all start the same way — the weight input must be
present and constant, of a float type, of the right rank; the bias, when there is one, must be constant and
hold one value per output channel. These helpers do those checks with one wording of each skip, so a rule
file holds only its own layout checks and its math. Each failure is a named
:class:`~bnfold.passes.reasons.SkipReason`:

- weight absent or computed at run time: ``WEIGHT_NOT_CONSTANT``;
- weight not fp16/bf16/fp32/fp64: ``UNSUPPORTED_DTYPE``;
- weight of the wrong rank, or not split into ``group`` groups: ``UNSUPPORTED_LAYOUT``;
- bias computed at run time: ``BIAS_NOT_CONSTANT``; bias not of shape ``[M]``: ``UNSUPPORTED_LAYOUT``.

The BN's channel count is checked by :func:`~bnfold.passes.rule.channel_count_matches`, which every rule calls
with its own notion of "output channels".
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import constant_input, int_attribute, weight_dtype

__all__ = [
    "ChannelBias",
    "ConstantWeight",
    "channel_bias",
    "constant_weight",
    "input_name",
    "weight_groups",
    "weight_rank",
]


@dataclasses.dataclass(frozen=True)
class ConstantWeight:
    """A node's constant weight input: the value it is read from, its array (as stored) and its ONNX dtype."""

    value: ir.Value
    array: np.ndarray
    dtype: ir.DataType

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


@dataclasses.dataclass(frozen=True)
class ChannelBias:
    """A per-output-channel bias in float64 (zeros when the node has none) and the name its folded form gets."""

    values: np.ndarray
    name_hint: str


def constant_weight(
    node: ir.Node,
    constants: ConstantResolver,
    *,
    label: str = "weight",
    missing: str | None = None,
    rank: int | None = None,
    min_rank: int | None = None,
) -> ConstantWeight:
    """Input 1 of ``node`` as a :class:`ConstantWeight`, or ``Skip``.

    ``label`` names the input in skip details (``"B"`` for Gemm); ``missing`` replaces ``"<label> input"`` in
    the detail for an absent input. ``rank`` requires that exact rank, ``min_rank`` at least that rank.
    """
    array = constant_input(node, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
    if array is None:
        raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, f"{node.op_type} has no {missing or f'{label} input'}")
    value = node.inputs[1]
    dtype = weight_dtype(value, array)
    if rank is not None and array.ndim != rank:
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"{node.op_type} {label} has rank {array.ndim}, expected {rank}")
    if min_rank is not None and array.ndim < min_rank:
        raise Skip(
            SkipReason.UNSUPPORTED_LAYOUT, f"{node.op_type} {label} has rank {array.ndim}, expected >= {min_rank}"
        )
    return ConstantWeight(value, array, dtype)


def weight_groups(node: ir.Node, weight: ConstantWeight) -> int:
    """The node's ``group``; ``Skip(UNSUPPORTED_LAYOUT)`` unless the weight has rank >= 3 and its leading axis
    splits into that many groups (Conv's output channels, ConvTranspose's input channels)."""
    group = int_attribute(node, "group", 1)
    if weight.array.ndim < 3 or group < 1 or weight.shape[0] % group:
        raise Skip(
            SkipReason.UNSUPPORTED_LAYOUT, f"{node.op_type} weight {weight.shape} does not split into group={group}"
        )
    return group


def input_name(node: ir.Node, index: int, default: str) -> str:
    """The name of input ``index`` of ``node`` when it is present, else ``default`` (the name for a new one)."""
    present = index < len(node.inputs) and node.inputs[index] is not None
    return node.inputs[index].name if present else default


def channel_bias(node: ir.Node, constants: ConstantResolver, channels: int, weight: ConstantWeight) -> ChannelBias:
    """Input 2 of ``node`` as a float64 bias of shape ``[channels]`` (zeros when absent), or ``Skip``.

    A new bias is named after the weight (``<weight>_bias``).
    """
    bias = constant_input(node, 2, constants, SkipReason.BIAS_NOT_CONSTANT)
    if bias is not None and bias.shape != (channels,):
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"bias shape {bias.shape} is not ({channels},)")
    values = np.zeros(channels) if bias is None else bias.astype(np.float64)
    return ChannelBias(values, input_name(node, 2, f"{weight.name}_bias"))


def weight_rank(node: ir.Node, constants: ConstantResolver) -> int | None:
    """The rank of input 1 when it is constant (a Conv's output has its weight's rank), else ``None``."""
    array = constants.array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if array is None else array.ndim
