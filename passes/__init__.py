"""bnfold's graph passes on ``onnx_ir`` (installed as ``bnfold.passes``).

One fold rule per neighbour op lives in its own module (``conv.py``, ``conv_transpose.py``, ``gemm.py``,
``matmul.py``, ``forward_conv.py``); the driver :class:`FoldBatchNormPass` loops over every BatchNormalization
and hands its producer (directly or through ``Add(constant)``, see ``through_add.py``) or its consumer to the
matching rule. :class:`LowerStandaloneBatchNormPass` lowers what is left to ``Mul`` + ``Add``;
:class:`DecomposeTrainingBatchNorm` rewrites training-mode BatchNormalization into primitive ops.
"""

from bnfold.passes.decompose_training import DecomposeTrainingBatchNorm
from bnfold.passes.fold_batch_norm import (
    DEFAULT_RULES,
    FoldBatchNormPass,
    FoldedCallback,
    FoldResult,
    count_nodes,
    rule_names,
    select_rules,
)
from bnfold.passes.lower_standalone import LowerStandaloneBatchNormPass
from bnfold.passes.reasons import Skip, SkipReason

__all__ = [
    "DEFAULT_RULES",
    "DecomposeTrainingBatchNorm",
    "FoldBatchNormPass",
    "FoldResult",
    "FoldedCallback",
    "LowerStandaloneBatchNormPass",
    "Skip",
    "SkipReason",
    "count_nodes",
    "rule_names",
    "select_rules",
]
