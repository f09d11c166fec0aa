"""Prove a folded model equivalent to its original with onnxruntime (CPU and CUDA execution providers).

``verify(original, candidate)`` runs both on seeded inputs and returns a :class:`VerifyReport`: per provider
and output the measured errors (kept apart from the verdict, so a saved report can be re-judged with
:meth:`VerifyReport.judge`), the verdict under the dtype-keyed :class:`ToleranceTable` — or, when that fails on
values alone, against the original evaluated in float64 (:class:`Float64Rule`) — and on a mismatch the fold
responsible. onnxruntime is imported only inside this package, and only when a name that needs it
(``verify``) is first used: the names below are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DEFAULT_ITERATIONS": "bnfold.validate.inputs",
    "DEFAULT_TOLERANCES": "bnfold.validate.tolerances",
    "ErrorStats": "bnfold.validate.metrics",
    "Float64Check": "bnfold.validate.report",
    "Float64Limits": "bnfold.validate.float64_reference",
    "Float64Rule": "bnfold.validate.tolerances",
    "InputRecord": "bnfold.validate.report",
    "InputSpec": "bnfold.validate.inputs",
    "Judgement": "bnfold.validate.report",
    "ProbeMetrics": "bnfold.validate.report",
    "ProviderRun": "bnfold.validate.report",
    "ProviderVerdict": "bnfold.validate.report",
    "TensorMetrics": "bnfold.validate.metrics",
    "Tolerance": "bnfold.validate.tolerances",
    "ToleranceTable": "bnfold.validate.tolerances",
    "TruthMetrics": "bnfold.validate.report",
    "VerificationTimeout": "bnfold.validate.verifier",
    "Verdict": "bnfold.validate.report",
    "VerifyReport": "bnfold.validate.report",
    "generate_inputs": "bnfold.validate.inputs",
    "input_specs": "bnfold.validate.inputs",
    "load_inputs": "bnfold.validate.inputs",
    "save_inputs": "bnfold.validate.inputs",
    "verify": "bnfold.validate.verifier",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold.validate' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
