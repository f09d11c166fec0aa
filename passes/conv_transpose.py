"""Fold ``ConvTranspose → BatchNormalization`` into the ConvTranspose.

ConvTranspose's weight is ``[C_in, C_out/group, k1..kn]``: the output channel of element ``W[i, j, ...]`` is
``(i // (C_in/group)) · (C_out/group) + j``. Viewing W as ``[group, C_in/group, C_out/group, k...]``, with
``s``/``t`` from :class:`~bnfold.passes.affine.Affine` viewed as ``[group, C_out/group]``::

    W'[g, i, j, ...] = W[g, i, j, ...] · s[g, j]
    b'[o]            = b[o] · s[o] + t[o]       (b = 0 when absent; one is created)

Strides, dilations, pads, auto_pad, output_padding and output_shape only place the kernel and do not affect
the fold. Ranks 1-D, 2-D, 3-D; group 1, grouped and depthwise.

Preconditions: W constant (``WEIGHT_NOT_CONSTANT``), float (``UNSUPPORTED_DTYPE``); ``C_in`` divisible by
``group`` (``UNSUPPORTED_LAYOUT``); BN has ``C_out = group · W.shape[1]`` channels (``PARAM_SHAPE_MISMATCH``);
bias constant (``BIAS_NOT_CONSTANT``) of shape ``[C_out]`` (``UNSUPPORTED_LAYOUT``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.conv import fold_output_channel_bias
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches, constant_input, weight_dtype


class ConvTransposeRule:
    name = "conv_transpose"
    op_type = "ConvTranspose"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        """The output has the weight's rank (``[N, M, spatial...]`` vs ``[M, C/group, k...]``)."""
        weight = constants.array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        return None if weight is None else weight.ndim

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_input(producer, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
        if weight is None:
            raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, "ConvTranspose has no weight input")
        weight_value = producer.inputs[1]
        dtype = weight_dtype(weight_value, weight)
        group_attribute = producer.attributes.get("group")
        group = 1 if group_attribute is None else group_attribute.as_int()
        if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
            raise Skip(
                SkipReason.UNSUPPORTED_LAYOUT,
                f"ConvTranspose weight {weight.shape} does not split into group={group}",
            )
        in_per_group, out_per_group, kernel = weight.shape[0] // group, weight.shape[1], weight.shape[2:]
        channel_count_matches(affine, group * out_per_group, producer)
        bias = constant_input(producer, 2, constants, SkipReason.BIAS_NOT_CONSTANT)
        grouped = weight.astype(np.float64).reshape(group, in_per_group, out_per_group, *kernel)
        scale = affine.scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
        return FoldPlan(
            updates=(
                TensorUpdate(producer, 1, (grouped * scale).reshape(weight.shape), dtype, weight_value.name),
                fold_output_channel_bias(producer, bias, affine, dtype, weight_value.name),
            )
        )
