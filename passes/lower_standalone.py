"""Lower a standalone inference BatchNormalization (no foldable neighbour) to one ``Mul`` and one ``Add``.

For runtimes without a BN kernel. With ``s = γ/√(var+ε)`` and ``t = β − mean·s`` computed once in float64
(:class:`~bnfold.passes.affine.Affine`) and cast once to ``X``'s dtype::

    Y = Add(Mul(X, s.reshape(C, 1, ..., 1)), t.reshape(C, 1, ..., 1))

The constants have shape ``[C, 1, ..., 1]`` (rank − 1 axes), so they broadcast onto axis 1 of ``X``. The Add
emits the BN's ``Y`` name. Used by :class:`~bnfold.passes.FoldBatchNormPass` with ``lower_standalone=True``
for every BN no rule could fold, and by :class:`LowerStandaloneBatchNormPass` on its own (it lowers every
inference-mode BN with constant parameters, without trying to fold).

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`), on top of the BN's own
(inference mode, constant 1-D params, finite affine):

- the rank of ``X`` (or ``Y``) is recorded or inferred (``RANK_UNKNOWN``) and is >= 2 (``UNSUPPORTED_LAYOUT``);
- ``X``'s element type is recorded or inferred and is fp16/bf16/fp32/fp64 (``UNSUPPORTED_DTYPE``);
- ``s`` and ``t`` fit that dtype (``FOLDED_WEIGHTS_OVERFLOW``).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import is_batch_norm
from bnfold.passes.casting import cast_checked
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.graph_edit import NameAllocator, TensorWriter, replace_with_channel_affine
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus
from bnfold.passes.rule import FOLDABLE_DTYPES, channel_shape
from bnfold.passes.scopes import (
    FoldResult,
    count_nodes,
    inference_affine,
    iter_scopes,
    new_record,
    require_finite,
    with_scale,
)

RULE_NAME = "lower_standalone"


def lower_batch_norm(batch_norm: ir.Node, affine: Affine, constants: ConstantResolver, writer: TensorWriter) -> str:
    """Replace ``batch_norm`` by ``Mul`` + ``Add`` (or ``Skip`` before changing anything); return a detail."""
    x, y = batch_norm.inputs[0], batch_norm.outputs[0]
    if x is None:
        raise Skip(SkipReason.NO_PRODUCER, "the BN has no input X")
    rank = constants.rank(x, y)
    if rank is None:
        raise Skip(SkipReason.RANK_UNKNOWN, f"neither the model nor ONNX shape inference tells the rank of {x.name!r}")
    if rank < 2:
        raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"{x.name!r} has rank {rank}; BN needs [N, C, ...]")
    dtype = constants.dtype(x, y)
    if dtype not in FOLDABLE_DTYPES:
        raise Skip(SkipReason.UNSUPPORTED_DTYPE, f"{x.name!r} has element type {dtype.name if dtype else 'unknown'}")
    shape = channel_shape(affine.channels, rank)
    scale = cast_checked(affine.scale.reshape(shape), dtype, "BN scale")
    shift = cast_checked(affine.shift.reshape(shape), dtype, "BN shift")
    hint = batch_norm.name or y.name
    scale_value = writer.constant(batch_norm, scale, dtype, f"{hint}_scale")
    shift_value = writer.constant(batch_norm, shift, dtype, f"{hint}_shift")
    writer.maybe_orphaned.extend(value for value in batch_norm.inputs[1:] if value is not None)
    replace_with_channel_affine(batch_norm, scale_value, shift_value, writer.names)
    return f"lowered to Mul + Add with [C{', 1' * (rank - 2)}] constants"


class LowerStandaloneBatchNormPass(ir.passes.InPlacePass):
    """Lower every inference-mode BatchNormalization with constant parameters to ``Mul`` + ``Add``.

    Run it after :class:`~bnfold.passes.FoldBatchNormPass` in a ``PassManager`` to lower what did not fold.
    Records of lowered BNs have status ``lowered`` and rule ``lower_standalone``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.report: FoldReport | None = None

    def call(self, model: ir.Model) -> FoldResult:
        nodes_before = count_nodes(model)
        constants = ConstantResolver(model)
        writer = TensorWriter(model, NameAllocator(model))
        records: list[BatchNormRecord] = []
        for scope in list(iter_scopes(model)):
            for index, node in enumerate(list(scope.graph)):
                if is_batch_norm(node):
                    record, affine = new_record(node, scope, index), None
                    try:
                        affine = inference_affine(node, scope.opset, constants)
                        require_finite(affine)
                        detail = lower_batch_norm(node, affine, constants, writer)
                        record = dataclasses.replace(record, status=FoldStatus.LOWERED, rule=RULE_NAME, detail=detail)
                    except Skip as skip:
                        record = dataclasses.replace(record, reason=skip.reason, detail=skip.detail)
                    records.append(with_scale(record, affine))
        writer.prune_orphans()
        self.report = FoldReport(tuple(records), nodes_before, count_nodes(model))
        return FoldResult(model, modified=bool(self.report.folded), report=self.report)
