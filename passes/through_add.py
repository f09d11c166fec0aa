"""Look through ``producer → Add(constant) → BatchNormalization`` (paddle/TF conv biases, Linear as MatMul + Add).

BN is affine per channel, so a constant added in front of it moves into its shift::

    BN(P + c) = s · (P + c) + t = s · P + (s · c + t)

When ``c`` is *per channel* — constant along every axis except the channel axis 1 of ``P``'s output — the
driver hands the producer's rule the affine ``(s, s · c + t)`` instead of ``(s, t)``. Rules with a bias
input (Conv, ConvTranspose, Gemm) absorb the whole shift and the Add is removed; MatMul keeps the Add and the
driver writes ``s · c + t`` into it (see :mod:`bnfold.passes.matmul`).

``c`` is per channel for an output of rank ``r`` when, right-aligned to ``r`` axes (numpy broadcasting),
every axis but axis 1 has size 1: ``[C, 1, 1]`` and ``[1, C, 1, 1]`` for a 4-D Conv output, ``[F]`` and
``[1, F]`` for a 2-D MatMul/Gemm output, and a scalar for any rank. ``[C]`` on a 4-D output is *not* per
channel (it broadcasts along the width).

Preconditions (the driver checks output readers the same way as for a direct producer):

- exactly one Add input is constant (else the BN's producer is an unsupported ``Add``: ``UNSUPPORTED_PRODUCER``);
- the rank of ``P``'s output is known from its rule or ``ConstantResolver.rank`` (``RANK_UNKNOWN``);
- ``c`` is per channel and no wider than ``P``'s output (``ADDED_CONSTANT_NOT_PER_CHANNEL``), with 1 or ``C``
  channels (``PARAM_SHAPE_MISMATCH``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason


@dataclasses.dataclass(frozen=True)
class ConstantAdd:
    """An ``Add`` of one runtime tensor and one constant."""

    node: ir.Node
    runtime_value: ir.Value
    constant_index: int
    constant: np.ndarray


def is_add(node: ir.Node) -> bool:
    return node.op_type == "Add" and node.domain in ("", "ai.onnx")


def match_constant_add(add: ir.Node, constants: ConstantResolver) -> ConstantAdd | None:
    """The Add's runtime input and its constant, or ``None`` unless exactly one input is constant."""
    if len(add.inputs) != 2 or any(value is None for value in add.inputs):
        return None
    arrays = [constants.array(value) for value in add.inputs]
    constant_indices = [i for i, array in enumerate(arrays) if array is not None]
    if len(constant_indices) != 1:
        return None
    index = constant_indices[0]
    return ConstantAdd(add, add.inputs[1 - index], index, arrays[index])


def per_channel_vector(constant: np.ndarray, rank: int, channels: int) -> np.ndarray:
    """``constant`` as a float64 ``[C]`` vector on axis 1 of a rank-``rank`` tensor, or ``Skip``."""
    if constant.ndim > rank or rank < 2:
        raise Skip(
            SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL,
            f"added constant of shape {constant.shape} widens a rank-{rank} tensor",
        )
    aligned = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(aligned) if axis != 1):
        raise Skip(
            SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL,
            f"added constant of shape {constant.shape} varies along an axis other than the channel axis 1",
        )
    if aligned[1] not in (1, channels):
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH,
            f"added constant has {aligned[1]} channels, BN has {channels}",
        )
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()


def absorb_added_constant(affine: Affine, per_channel: np.ndarray) -> Affine:
    """The affine of ``BN(P + c)`` seen from ``P``: ``(s, s · c + t)``."""
    return Affine(scale=affine.scale, shift=affine.scale * per_channel + affine.shift)
