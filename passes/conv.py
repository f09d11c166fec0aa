"""Fold ``Conv → BatchNormalization`` into the Conv.

Math (``s = γ/√(var+ε)``, ``t = β − mean·s`` from :class:`~bnfold.passes.affine.Affine`), per output
channel ``m``::

    W'[m, ...] = W[m, ...] · s[m]
    b'[m]      = b[m] · s[m] + t[m]        (b = 0 when the Conv has no bias; one is created)

Conv's weight is ``[M, C/group, k1..kn]`` for every rank (1-D, 2-D, 3-D) and every ``group`` (grouped and
depthwise included): output channel ``m`` always owns row ``m``. Strides, dilations, pads, auto_pad only move
where the kernel is applied, so they do not affect the fold.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- W is constant (``WEIGHT_NOT_CONSTANT``) and fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- the bias, when present, is constant (``BIAS_NOT_CONSTANT``) and has shape ``[M]`` (``UNSUPPORTED_LAYOUT``);
- BN has ``M`` channels (``PARAM_SHAPE_MISMATCH``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import (
    FoldPlan,
    TensorUpdate,
    channel_count_matches,
    constant_input,
    weight_dtype,
)


def fold_output_channel_bias(
    producer: ir.Node, bias: np.ndarray | None, affine: Affine, dtype: ir.DataType, weight_name: str
) -> TensorUpdate:
    """The planned bias input 2 ``b' = b·s + t`` shared by Conv and ConvTranspose (bias shape ``[M]``)."""
    if bias is not None and bias.shape != (affine.channels,):
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"bias shape {bias.shape} is not ({affine.channels},)")
    bias64 = np.zeros(affine.channels) if bias is None else bias.astype(np.float64)
    hint = producer.inputs[2].name if bias is not None else f"{weight_name}_bias"
    return TensorUpdate(producer, 2, bias64 * affine.scale + affine.shift, dtype, hint)


class ConvRule:
    name = "conv"
    op_type = "Conv"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        """The output has the weight's rank (``[N, M, spatial...]`` vs ``[M, C/group, k...]``)."""
        weight = constants.array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        return None if weight is None else weight.ndim

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_input(producer, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
        if weight is None:
            raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, "Conv has no weight input")
        weight_value = producer.inputs[1]
        dtype = weight_dtype(weight_value, weight)
        if weight.ndim < 3:
            raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"Conv weight has rank {weight.ndim}, expected >= 3")
        channel_count_matches(affine, weight.shape[0], producer)
        bias = constant_input(producer, 2, constants, SkipReason.BIAS_NOT_CONSTANT)
        per_row = affine.scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        return FoldPlan(
            updates=(
                TensorUpdate(producer, 1, weight, dtype, weight_value.name, row_scale=per_row),
                fold_output_channel_bias(producer, bias, affine, dtype, weight_value.name),
            )
        )
