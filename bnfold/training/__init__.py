"""bnfold's reference BatchNormalization: numpy forward/backward, every opset's node semantics, ONNX functions.

- :func:`batch_norm_forward` / :func:`batch_norm_backward` — exact (float64) reference in numpy,
  ``convention="onnx"`` or ``"torch"`` (:mod:`bnfold.training.reference`).
- :func:`evaluate_batch_norm_node` — run any BatchNormalization node by the book for its opset
  (:mod:`bnfold.training.opsets`).
- :func:`training_functions` — ``bnfold.BatchNormalizationTraining`` and its gradient as ONNX FunctionProtos
  written with onnxscript (:mod:`bnfold.training.function`).
- :func:`lower_training` — rewrite training-mode BatchNormalization nodes into that function
  (:mod:`bnfold.training.lowering`, pass :class:`bnfold.training.decompose.DecomposeTrainingBatchNorm`).

The function and lowering names are imported lazily so that the numpy reference stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from bnfold.training.opsets import (
    BatchNormSemantics,
    evaluate_batch_norm_node,
    node_semantics,
    resolve_semantics,
    schema_version,
)
from bnfold.training.reference import (
    DEFAULT,
    BatchNormOutputs,
    InferenceGradients,
    TrainingGradients,
    batch_norm_backward,
    batch_norm_forward,
    batch_statistics,
    inverse_std,
)

_LAZY = {
    "training_functions": "bnfold.training.function",
    "BatchNormalizationTraining": "bnfold.training.function",
    "BatchNormalizationTrainingGrad": "bnfold.training.function",
    "lower_training": "bnfold.training.lowering",
    "DecomposeTrainingBatchNorm": "bnfold.training.decompose",
}

__all__ = [
    "DEFAULT",
    "BatchNormOutputs",
    "BatchNormSemantics",
    "InferenceGradients",
    "TrainingGradients",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_statistics",
    "evaluate_batch_norm_node",
    "inverse_std",
    "node_semantics",
    "resolve_semantics",
    "schema_version",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
