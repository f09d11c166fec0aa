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
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches
from bnfold.passes.weights import channel_bias, constant_weight, weight_groups, weight_rank


class ConvTransposeRule:
    name = "conv_transpose"
    op_type = "ConvTranspose"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        """The output has the weight's rank (``[N, M, spatial...]`` vs ``[C_in, C_out/group, k...]``)."""
        return weight_rank(producer, constants)

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_weight(producer, constants)
        group = weight_groups(producer, weight)
        in_per_group, out_per_group, kernel = weight.shape[0] // group, weight.shape[1], weight.shape[2:]
        channel_count_matches(affine, group * out_per_group, producer)
        bias = channel_bias(producer, constants, affine.channels, weight)
        grouped = weight.array.astype(np.float64).reshape(group, in_per_group, out_per_group, *kernel)
        scale = affine.scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
        return FoldPlan(
            updates=(
                TensorUpdate(producer, 1, (grouped * scale).reshape(weight.shape), weight.dtype, weight.name),
                TensorUpdate(producer, 2, bias.values * affine.scale + affine.shift, weight.dtype, bias.name_hint),
            )
        )
