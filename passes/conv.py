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

import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches
from bnfold.passes.weights import channel_bias, constant_weight, weight_rank


class ConvRule:
    name = "conv"
    op_type = "Conv"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        """The output has the weight's rank (``[N, M, spatial...]`` vs ``[M, C/group, k...]``)."""
        return weight_rank(producer, constants)

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_weight(producer, constants, min_rank=3)
        channel_count_matches(affine, weight.shape[0], producer)
        bias = channel_bias(producer, constants, weight.shape[0], weight)
        per_row = affine.scale.reshape((-1,) + (1,) * (weight.array.ndim - 1))
        return FoldPlan(
            updates=(
                TensorUpdate(producer, 1, weight.array, weight.dtype, weight.name, row_scale=per_row),
                TensorUpdate(producer, 2, bias.values * affine.scale + affine.shift, weight.dtype, bias.name_hint),
            )
        )
