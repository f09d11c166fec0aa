"""Fold ``BatchNormalization → Gemm`` into the following Gemm (a *forward* fold).

Gemm computes ``Y = alpha · A·B' + beta · C`` with ``A`` ``[N, K]`` (``transA = 0``) and ``B' = Bᵀ if transB
else B`` (``[K, F]``). The BN's output is ``A``; BN scales axis 1, the axis ``B'`` contracts:
``A' = A·diag(s) + 1·tᵀ`` (``s``, ``t`` from :class:`~bnfold.passes.affine.Affine`, per input feature; through a
flatten, per feature of the channel's block, see :mod:`~bnfold.passes.forward_path`). Because Gemm is linear
in ``A``::

    alpha · A'·B' + beta · C = alpha · A·(diag(s)·B') + (beta · C + alpha · 1·(tᵀ·B'))

so the fold writes::

    B'[k, :] = B'[k, :] · s[k]              (row k of B when transB = 0, column k of B when transB = 1)
    C'       = beta · C + alpha · (tᵀ·B')   (C = 0 when absent or when beta = 0; a C is created when absent)
    beta'    = 1                            (alpha, transA, transB unchanged)

``tᵀ·B'`` is computed from the original ``B`` in float64. ``C`` may have any shape that broadcasts to
``[N, F]`` (scalar, ``[1]``, ``[F]``, ``[1, F]``, ``[N, 1]``, ``[N, F]``); ``C'`` has the broadcast of that
shape with ``[F]``. With ``transA = 1`` ``A`` is ``[K, N]``: BN's channel axis is the Gemm's row axis, which no
weight scales.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- (driver) BN's output, or the end of a pass-through path after it, is read by input 0 of this Gemm only;
- ``transA = 0`` (``GEMM_INPUT_TRANSPOSED``);
- B constant (``WEIGHT_NOT_CONSTANT``), 2-D (``UNSUPPORTED_LAYOUT``), fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- BN has ``K`` channels, or ``K`` is a multiple of them through a flatten (``PARAM_SHAPE_MISMATCH``);
- C, when present and ``beta != 0``, constant (``BIAS_NOT_CONSTANT``) of rank <= 2 with a last dimension of 1
  or ``F`` (``UNSUPPORTED_LAYOUT``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.forward_matmul import feature_shift
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import (
    AttributeUpdate,
    FoldPlan,
    TensorUpdate,
    channel_count_matches,
    constant_input,
    float_attribute,
    int_attribute,
    weight_dtype,
)


class ForwardGemmRule:
    name = "forward_gemm"
    op_type = "Gemm"

    def input_features(self, consumer: ir.Node, constants: ConstantResolver) -> int:
        weight, _, transposed = self._weight(consumer, constants)
        return weight.shape[1] if transposed else weight.shape[0]

    def plan_forward(self, consumer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight, dtype, transposed = self._weight(consumer, constants)
        inputs, outputs = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
        channel_count_matches(affine, inputs, consumer)
        beta = float_attribute(consumer, "beta", 1.0)
        alpha = np.float64(float_attribute(consumer, "alpha", 1.0))
        shift = alpha * feature_shift(weight, affine.shift, transposed)
        bias = _scaled_bias(consumer, beta, outputs, constants) + shift
        per_input = affine.scale.reshape(1, -1) if transposed else affine.scale.reshape(-1, 1)
        weight_value = consumer.inputs[1]
        has_bias = len(consumer.inputs) > 2 and consumer.inputs[2] is not None
        bias_hint = consumer.inputs[2].name if has_bias else f"{weight_value.name}_C"
        return FoldPlan(
            updates=(
                TensorUpdate(consumer, 1, weight, dtype, weight_value.name, row_scale=per_input),
                TensorUpdate(consumer, 2, bias, dtype, bias_hint),
            ),
            attributes=(AttributeUpdate(consumer, ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)),),
        )

    @staticmethod
    def _weight(consumer: ir.Node, constants: ConstantResolver) -> tuple[np.ndarray, ir.DataType, bool]:
        if int_attribute(consumer, "transA", 0) != 0:
            raise Skip(SkipReason.GEMM_INPUT_TRANSPOSED, f"Gemm {consumer.name!r} has transA=1")
        weight = constant_input(consumer, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
        if weight is None:
            raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, "Gemm has no B input")
        dtype = weight_dtype(consumer.inputs[1], weight)
        if weight.ndim != 2:
            raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"Gemm B has rank {weight.ndim}, expected 2")
        return weight, dtype, int_attribute(consumer, "transB", 0) != 0


def _scaled_bias(consumer: ir.Node, beta: float, features: int, constants: ConstantResolver) -> np.ndarray:
    """``beta · C`` in float64, shaped to broadcast onto ``[N, F]`` (zeros ``[F]`` when there is no C term)."""
    bias = constant_input(consumer, 2, constants, SkipReason.BIAS_NOT_CONSTANT) if beta != 0.0 else None
    if bias is None:
        return np.zeros(features)
    if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, features)):
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"Gemm C of shape {bias.shape} does not broadcast to [N, {features}]")
    return np.float64(beta) * bias.astype(np.float64)
