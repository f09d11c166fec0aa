"""Fold ``BatchNormalization → MatMul`` into the following MatMul (a *forward* fold).

The BN's output is ``A`` of ``MatMul(A, W)``, ``A`` 2-D ``[N, K]`` and ``W`` a constant ``[K, F]``. BN scales
axis 1 of ``A``, the axis the weight contracts: ``A' = A·diag(s) + 1·tᵀ`` (``s``, ``t`` from
:class:`~bnfold.passes.affine.Affine`, per input feature; through a flatten, per feature of the channel's
block, see :mod:`~bnfold.passes.forward_path`). Because MatMul is linear in ``A``::

    A'·W = A·(diag(s)·W) + 1·(tᵀ·W)

so the fold writes ``W'[k, :] = W[k, :] · s[k]`` (row ``k`` scaled) and a shift ``u[f] = Σ_k t[k]·W[k, f]``
(computed from the original ``W``, in float64). MatMul has no bias input, so the shift is added after it: when
the MatMul's output is read only by an ``Add`` of a per-feature constant ``c`` (``[F]``, ``[1, F]``, a scalar
— a Linear exported as MatMul + Add), that constant becomes ``c + u``; otherwise a new ``Add(MatMul, u)`` emits
the MatMul's output name. The driver places the shift from
:attr:`~bnfold.passes.rule.FoldPlan.residual_shift`, as for the backward :mod:`~bnfold.passes.matmul` rule.

For ``A`` of rank > 2 (``[B, T, K]``) the weight contracts the last axis, not BN's axis 1, and for rank 1
there is no channel axis: the rule skips.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- (driver) BN's output, or the end of a pass-through path after it, is read by input 0 of this MatMul only;
- W constant (``WEIGHT_NOT_CONSTANT``), 2-D (``UNSUPPORTED_LAYOUT``), fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- ``A``'s rank known — recorded, or by ONNX shape inference — (``RANK_UNKNOWN``) and 2
  (``CHANNEL_AXIS_NOT_WEIGHT_AXIS``);
- BN has ``K`` channels, or ``K`` is a multiple of them through a flatten (``PARAM_SHAPE_MISMATCH``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches, constant_input, weight_dtype

# Bytes of float64 weight rows widened at a time by :func:`feature_shift`.
_BLOCK_BYTES = 1 << 20


def feature_shift(weight: np.ndarray, shift: np.ndarray, transposed: bool = False) -> np.ndarray:
    """``u[f] = Σ_k shift[k] · W'[k, f]`` in float64, with ``W' = Wᵀ`` if ``transposed`` else ``W`` (``[K, F]``).

    Rows of ``weight`` are widened a block at a time, so a large weight never exists whole in float64.
    """
    rows, columns = weight.shape
    step = max(1, _BLOCK_BYTES // (8 * max(columns, 1)))
    if transposed:  # weight is [F, K]: one output feature per row
        result = np.empty(rows, dtype=np.float64)
        for start in range(0, rows, step):
            result[start : start + step] = weight[start : start + step].astype(np.float64) @ shift
        return result
    result = np.zeros(columns, dtype=np.float64)
    for start in range(0, rows, step):
        result += shift[start : start + step] @ weight[start : start + step].astype(np.float64)
    return result


class ForwardMatMulRule:
    name = "forward_matmul"
    op_type = "MatMul"

    def input_features(self, consumer: ir.Node, constants: ConstantResolver) -> int:
        return self._weight(consumer, constants)[0].shape[0]

    def plan_forward(self, consumer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight, dtype = self._weight(consumer, constants)
        rank = constants.rank(consumer.inputs[0])
        if rank is None:
            raise Skip(SkipReason.RANK_UNKNOWN, "ONNX shape inference cannot tell the rank of the MatMul input")
        if rank != 2:
            raise Skip(
                SkipReason.CHANNEL_AXIS_NOT_WEIGHT_AXIS,
                f"MatMul input has rank {rank}: BN normalises axis 1, the weight contracts axis {rank - 1}",
            )
        channel_count_matches(affine, weight.shape[0], consumer)
        weight_value = consumer.inputs[1]
        return FoldPlan(
            updates=(
                TensorUpdate(consumer, 1, weight, dtype, weight_value.name, row_scale=affine.scale.reshape(-1, 1)),
            ),
            residual_shift=feature_shift(weight, affine.shift),
            residual_dtype=dtype,
        )

    @staticmethod
    def _weight(consumer: ir.Node, constants: ConstantResolver) -> tuple[np.ndarray, ir.DataType]:
        weight = constant_input(consumer, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
        if weight is None:
            raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, "MatMul has no second input")
        dtype = weight_dtype(consumer.inputs[1], weight)
        if weight.ndim != 2:
            raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul weight has rank {weight.ndim}, expected 2")
        return weight, dtype
