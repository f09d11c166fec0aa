"""Fold ``BatchNormalization → Conv`` into the following Conv (a *forward* fold).

The BN feeds the Conv's input ``X``: ``X' = X · s[c] + t[c]`` per input channel ``c`` (``s``, ``t`` from
:class:`~bnfold.passes.affine.Affine`). Conv's weight is ``[M, C/group, k...]``; output channel ``m`` of group
``g = m // (M/group)`` reads input channels ``c = g · (C/group) + j``. Because a Conv is linear in ``X``::

    Conv(X')[m] = Σ_{j,k} W[m, j, k] · (s[c] · X[c, .] + t[c]) + b[m]
                = Σ_{j,k} (W[m, j, k] · s[c]) · X[c, .] + (b[m] + Σ_{j,k} W[m, j, k] · t[c])

so the fold writes::

    W'[m, j, k...] = W[m, j, k...] · s[g · (C/group) + j]
    b'[m]          = b[m] + Σ_{j, k...} W[m, j, k...] · t[g · (C/group) + j]     (b = 0 when absent)

This is exact only when every kernel tap reads a real input pixel: with zero padding, the padded border is 0
in the original (after BN) but the folded Conv adds the ``t`` term there too. Strides and dilations are fine.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- (driver) BN's output is read by this Conv's input 0 only and is not a graph output;
- no padding: ``pads`` all 0 (absent means 0) or ``auto_pad=VALID``; ``SAME_UPPER``/``SAME_LOWER`` only when
  every dilated kernel extent is 1, which never pads (``CONV_HAS_PADDING``);
- W constant (``WEIGHT_NOT_CONSTANT``), float (``UNSUPPORTED_DTYPE``), rank >= 3 with ``M`` divisible by
  ``group`` (``UNSUPPORTED_LAYOUT``); BN has ``C = group · W.shape[1]`` channels (``PARAM_SHAPE_MISMATCH``);
- bias constant (``BIAS_NOT_CONSTANT``) of shape ``[M]`` (``UNSUPPORTED_LAYOUT``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches
from bnfold.passes.weights import channel_bias, constant_weight, weight_groups


def check_no_padding(conv: ir.Node, kernel: tuple[int, ...]) -> None:
    """``Skip(CONV_HAS_PADDING)`` unless the Conv never reads a padded pixel."""
    auto_pad_attribute = conv.attributes.get("auto_pad")
    auto_pad = "NOTSET" if auto_pad_attribute is None else auto_pad_attribute.as_string()
    if auto_pad == "VALID":
        return
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dilations_attribute = conv.attributes.get("dilations")
        dilations = [1] * len(kernel) if dilations_attribute is None else list(dilations_attribute.as_ints())
        extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=False)]
        if any(extent != 1 for extent in extents):
            raise Skip(SkipReason.CONV_HAS_PADDING, f"auto_pad={auto_pad} pads a kernel of extent {extents}")
        return
    pads_attribute = conv.attributes.get("pads")
    pads = [] if pads_attribute is None else list(pads_attribute.as_ints())
    if any(pad != 0 for pad in pads):
        raise Skip(SkipReason.CONV_HAS_PADDING, f"pads={pads}: border pixels would see the BN shift")


class ForwardConvRule:
    name = "forward_conv"
    op_type = "Conv"

    def plan_forward(self, consumer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_weight(consumer, constants)
        group = weight_groups(consumer, weight)
        out_channels, in_per_group, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        channel_count_matches(affine, group * in_per_group, consumer)
        check_no_padding(consumer, kernel)
        bias = channel_bias(consumer, constants, out_channels, weight)
        grouped = weight.array.astype(np.float64).reshape(group, out_channels // group, in_per_group, *kernel)
        per_input = (group, 1, in_per_group) + (1,) * len(kernel)
        folded_weight = (grouped * affine.scale.reshape(per_input)).reshape(weight.shape)
        shift_term = (grouped * affine.shift.reshape(per_input)).sum(axis=tuple(range(2, grouped.ndim)))
        return FoldPlan(
            updates=(
                TensorUpdate(consumer, 1, folded_weight, weight.dtype, weight.name),
                TensorUpdate(consumer, 2, bias.values + shift_term.reshape(out_channels), weight.dtype, bias.name_hint),
            )
        )
