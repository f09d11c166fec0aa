"""Fold ``Gemm → BatchNormalization`` into the Gemm.

Gemm computes ``Y = alpha · A'·B' + beta · C`` with ``A' = Aᵀ if transA else A`` (``[N, K]``) and
``B' = Bᵀ if transB else B`` (``[K, F]``). Its output is always 2-D ``[N, F]``, so BN's channel axis 1 is the
feature axis ``f`` that column ``f`` of ``B'`` produces. With ``s``, ``t`` from
:class:`~bnfold.passes.affine.Affine`::

    BN(Y)[n, f] = s[f] · (alpha · (A'·B')[n, f] + beta · C[n, f]) + t[f]
                = alpha · (A' · (B' · diag(s)))[n, f] + 1 · (beta · C[n, f] · s[f] + t[f])

so the fold writes::

    B'[:, f] = B'[:, f] · s[f]       (column f of B when transB = 0, row f of B when transB = 1)
    C'       = beta · C · s + t      (C = 0 when absent or when beta = 0; a C is created when absent)
    beta'    = 1                     (alpha, transA, transB unchanged)

Writing ``beta · C · s + t`` with ``beta' = 1`` (rather than dividing by ``beta``) is exact for every
``beta``, including 0 and values other than 1 — leaving ``beta`` as is and writing ``C · s + t`` is the
classic mis-fold. ``C`` may have any shape that broadcasts to ``[N, F]`` (scalar, ``[1]``, ``[F]``,
``[1, F]``, ``[N, 1]``, ``[N, F]``); ``C'`` has the broadcast of that shape with ``[F]``, which still
broadcasts to ``[N, F]``.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- B is constant (``WEIGHT_NOT_CONSTANT``), 2-D (``UNSUPPORTED_LAYOUT``), fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- BN has ``F`` channels (``PARAM_SHAPE_MISMATCH``);
- C, when present and ``beta != 0``, is constant (``BIAS_NOT_CONSTANT``) of rank <= 2 with a last dimension of
  1 or ``F`` (``UNSUPPORTED_LAYOUT``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import (
    AttributeUpdate,
    FoldPlan,
    TensorUpdate,
    channel_count_matches,
    constant_input,
    float_attribute,
    int_attribute,
)
from bnfold.passes.weights import constant_weight, input_name


def _gemm_bias(producer: ir.Node, beta: float, features: int, constants: ConstantResolver) -> np.ndarray:
    """``beta · C`` in float64, shaped to broadcast onto ``[N, F]`` (zeros ``[F]`` when there is no C term)."""
    if beta == 0.0:
        return np.zeros(features)
    bias = constant_input(producer, 2, constants, SkipReason.BIAS_NOT_CONSTANT)
    if bias is None:
        return np.zeros(features)
    if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, features)):
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"Gemm C of shape {bias.shape} does not broadcast to [N, {features}]")
    return np.float64(beta) * bias.astype(np.float64)


class GemmRule:
    name = "gemm"
    op_type = "Gemm"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        return 2

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_weight(producer, constants, label="B", rank=2)
        transposed = int_attribute(producer, "transB", 0) != 0
        features = weight.shape[0] if transposed else weight.shape[1]
        channel_count_matches(affine, features, producer)
        beta = float_attribute(producer, "beta", 1.0)
        bias = _gemm_bias(producer, beta, features, constants)
        per_feature = affine.scale.reshape(-1, 1) if transposed else affine.scale.reshape(1, -1)
        bias_hint = input_name(producer, 2, f"{weight.name}_C")
        return FoldPlan(
            updates=(
                TensorUpdate(producer, 1, weight.array, weight.dtype, weight.name, row_scale=per_feature),
                TensorUpdate(producer, 2, bias * affine.scale + affine.shift, weight.dtype, bias_hint),
            ),
            attributes=(AttributeUpdate(producer, ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)),),
        )
