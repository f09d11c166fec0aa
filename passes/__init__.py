"""bnfold's graph passes on ``onnx_ir`` (installed as ``bnfold.passes``).

One fold rule per neighbour op lives in its own module (``conv.py``, ``conv_transpose.py``, ``gemm.py``,
``matmul.py``, ``forward_conv.py``, ...), listed in :data:`DEFAULT_RULES` (``registry.py``); the driver
:class:`FoldBatchNormPass` (``fold_batch_norm.py``) loops over every BatchNormalization and hands its producer
(directly, or through ``Add(constant)`` and a channel-keeping reshape, see ``through_add.py`` and
``through_reshape.py``; a ``Concat`` is split over its inputs, ``concat_split.py``) or its consumer to the matching
rule. Forward folds walk a path of value-preserving, pooling and flattening nodes first (``forward_path.py``,
``reshape_flatten.py``) into ``forward_conv.py``, ``forward_gemm.py`` or ``forward_matmul.py``; ``precision.py``
estimates what a fold costs in the weights' dtype (the fp16 guard).
``rule.py`` is the rule contract, ``weights.py`` the checks every weight-carrying rule starts with,
``casting.py`` the one checked cast of planned tensors, ``constants.py`` which values are constant (with
``constant_eval.py``, a bounded evaluator of the few shape and cast ops exporters compute parameters with;
``freeze_initializer_inputs.py`` is the opt-in that makes overridable initializer inputs constant).
:class:`LowerStandaloneBatchNormPass` lowers what is left to ``Mul`` + ``Add``. (Training-mode BatchNormalization
is lowered by :class:`bnfold.training.decompose.DecomposeTrainingBatchNorm`.)

This package is the lowest layer: it imports onnx, onnx_ir, numpy, ml_dtypes and itself only (enforced by
``passes/ruff.toml`` and ``tests/test_layers.py``).
"""

from bnfold.passes.fold_batch_norm import FoldBatchNormPass, FoldedCallback, FoldResult, count_nodes
from bnfold.passes.lower_standalone import LowerStandaloneBatchNormPass
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.registry import DEFAULT_RULES, AnyRule, rule_names, select_rules

__all__ = [
    "DEFAULT_RULES",
    "AnyRule",
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
