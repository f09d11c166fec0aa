"""``lower_training``: make a model with training-mode BatchNormalization runnable on every provider."""

from __future__ import annotations

import onnx_ir as ir

from bnfold.files.load import ModelInput, as_model
from bnfold.training.decompose import DecomposeTrainingBatchNorm


def lower_training(model_or_path: ModelInput) -> tuple[ir.Model, int]:
    """Rewrite every training-mode BatchNormalization into ``bnfold.BatchNormalizationTraining``.

    Returns ``(model, count)``: the lowered model and how many nodes were rewritten (0 leaves the model as
    it was). A given ``ir.Model`` is copied first (tensors are shared, never modified); a path is loaded with
    :func:`bnfold.files.load_model`. See :mod:`bnfold.training.decompose` for what changes.

    Raises:
        InvalidModelError: unreadable model, an invalid BatchNormalization node, or an unknown dtype.
        UsageError: a training-mode BatchNormalization in a model below opset 7.
    """
    model = model_or_path.clone() if isinstance(model_or_path, ir.Model) else as_model(model_or_path)
    result = DecomposeTrainingBatchNorm()(model)
    return result.model, len(result.rewritten)
