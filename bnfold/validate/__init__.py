"""Prove a folded model equivalent to its original with onnxruntime (CPU and CUDA execution providers).

``verify(original, candidate)`` runs both on seeded inputs and returns a :class:`VerifyReport`: per provider
and output the measured errors (kept apart from the verdict, so a saved report can be re-judged with
:meth:`VerifyReport.judge`), the verdict under the dtype-keyed :class:`ToleranceTable`, and on a mismatch
the fold responsible. onnxruntime is imported only inside this package.
"""

from bnfold.validate.inputs import InputSpec, generate_inputs, input_specs, load_inputs, save_inputs
from bnfold.validate.metrics import ErrorStats, TensorMetrics
from bnfold.validate.report import (
    InputRecord,
    Judgement,
    ProbeMetrics,
    ProviderRun,
    ProviderVerdict,
    Verdict,
    VerifyReport,
)
from bnfold.validate.tolerances import DEFAULT_TOLERANCES, Tolerance, ToleranceTable
from bnfold.validate.verifier import DEFAULT_ITERATIONS, verify

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_TOLERANCES",
    "ErrorStats",
    "InputRecord",
    "InputSpec",
    "Judgement",
    "ProbeMetrics",
    "ProviderRun",
    "ProviderVerdict",
    "TensorMetrics",
    "Tolerance",
    "ToleranceTable",
    "Verdict",
    "VerifyReport",
    "generate_inputs",
    "input_specs",
    "load_inputs",
    "save_inputs",
    "verify",
]
