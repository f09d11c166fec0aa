"""bnfold's graph passes on ``onnx_ir`` (installed as ``bnfold.passes``).

One fold rule per producer op lives in its own module (``conv.py``, ``conv_transpose.py``, ...); the driver
:class:`FoldBatchNormPass` loops over every BatchNormalization and hands its producer to the matching rule.
"""

from bnfold.passes.fold_batch_norm import (
    DEFAULT_RULES,
    FoldBatchNormPass,
    FoldResult,
    count_nodes,
    rule_names,
    select_rules,
)
from bnfold.passes.reasons import Skip, SkipReason

__all__ = [
    "DEFAULT_RULES",
    "FoldBatchNormPass",
    "FoldResult",
    "Skip",
    "SkipReason",
    "count_nodes",
    "rule_names",
    "select_rules",
]
