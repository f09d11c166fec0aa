"""Fold ``MatMul → BatchNormalization`` and ``MatMul → Add(constant) → BatchNormalization``.

``MatMul(A, W)`` with a constant 2-D weight ``W`` (``[K, F]``) maps ``W``'s columns to the *last* axis of
its output. BN normalises axis 1. The two coincide only for a 2-D output ``[N, F]``; with ``s``, ``t`` from
:class:`~bnfold.passes.affine.Affine`::

    BN(A·W + c)[n, f] = (A · (W · diag(s)))[n, f] + (c[f] · s[f] + t[f])

so the fold writes ``W'[:, f] = W[:, f] · s[f]`` and a per-feature shift ``c · s + t`` (``c = 0`` without the
Add). MatMul has no bias input, so the shift stays an ``Add`` after the MatMul: the existing ``Add`` gets the
new constant (``[F]``), or, without one, the BN is replaced by ``Add(MatMul, t)``. The driver does that
from :attr:`~bnfold.passes.rule.FoldPlan.residual_shift` (and, for the Add, checks that ``c`` is per feature).

MatMul + Add is *not* turned into Gemm: Gemm needs a 2-D ``A`` and its own dtype list, and onnxruntime fuses
MatMul + Add itself when optimisations are on; keeping the Add is valid for every input rank and dtype.

For an output of rank > 2 (``[B, T, F]``) BN's axis 1 is ``T``, which the weight does not touch: a per-``T``
scale cannot move into ``W``, so the rule skips (``CHANNEL_AXIS_NOT_WEIGHT_AXIS``).

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- W is constant (``WEIGHT_NOT_CONSTANT``), 2-D (``UNSUPPORTED_LAYOUT``), fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- the output rank is known — recorded on the MatMul output or its ``A`` input, or found by ONNX shape
  inference (:mod:`~bnfold.passes.ranks`) — (``RANK_UNKNOWN``) and is 2 (``CHANNEL_AXIS_NOT_WEIGHT_AXIS``);
- BN has ``F`` channels (``PARAM_SHAPE_MISMATCH``).
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches
from bnfold.passes.weights import constant_weight


class MatMulRule:
    name = "matmul"
    op_type = "MatMul"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        rank = constants.rank(producer.outputs[0])
        if rank is not None:
            return rank
        a_rank = constants.rank(producer.inputs[0] if producer.inputs else None)
        if a_rank is None:
            return None
        return a_rank if a_rank >= 2 else 1  # a 2-D weight keeps A's rank; a 1-D A drops an axis

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        weight = constant_weight(producer, constants, missing="second input", rank=2)
        rank = self.output_rank(producer, constants)
        if rank is None:
            raise Skip(SkipReason.RANK_UNKNOWN, "ONNX shape inference cannot tell the rank of the MatMul output")
        if rank != 2:
            raise Skip(
                SkipReason.CHANNEL_AXIS_NOT_WEIGHT_AXIS,
                f"MatMul output has rank {rank}: BN normalises axis 1, the weight maps to axis {rank - 1}",
            )
        channel_count_matches(affine, weight.shape[1], producer)
        return FoldPlan(
            updates=(TensorUpdate(producer, 1, weight.array, weight.dtype, weight.name, row_scale=affine.scale),),
            residual_shift=affine.shift,
            residual_dtype=weight.dtype,
        )
