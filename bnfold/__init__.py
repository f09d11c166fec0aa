"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models and prove the result equivalent.

Public API (each name is imported lazily so that ``import bnfold`` stays light):

- :func:`fold` — fold every foldable BatchNormalization, return ``(model, FoldReport)``.
- :func:`verify` — run original and candidate in onnxruntime and compare (``bnfold.validate``).
- :func:`check` — which BatchNormalization nodes could still be folded (a CI gate).
- :func:`fold_file` — fold a model file: stage, verify, commit atomically (what ``bnfold MODEL`` runs), with
  :class:`FoldOptions` and :class:`VerifyOptions`; :func:`load_model` / :func:`save_model` (atomic).
- :func:`lower_training` — rewrite training-mode BatchNormalization into primitive ops (``bnfold.training``).
- :func:`recalibrate` — re-estimate BN running statistics from data before folding (``bnfold.recalibration``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fold": "bnfold.api",
    "check": "bnfold.api",
    "fold_file": "bnfold.workflow",
    "FoldOptions": "bnfold.workflow",
    "FoldOutcome": "bnfold.workflow",
    "VerifyOptions": "bnfold.validate.options",
    "load_model": "bnfold.files",
    "save_model": "bnfold.files",
    "FoldReport": "bnfold.report",
    "BatchNormRecord": "bnfold.report",
    "SkipReason": "bnfold.passes",
    "verify": "bnfold.validate",
    "VerifyReport": "bnfold.validate",
    "lower_training": "bnfold.training",
    "recalibrate": "bnfold.recalibration",
    "RecalibrationReport": "bnfold.recalibration",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The lazy public names too (``fold``, ``verify``, ``recalibrate``...), so ``dir(bnfold)`` shows the API."""
    return sorted({*globals(), *_LAZY})
