"""What a verification run needs, as one frozen, picklable value: :class:`VerifyOptions`.

The CLI builds it once from its flags; the fold workflow (:mod:`bnfold.workflow`) hands it to
:func:`verify_with`, in this process or in a batch worker (so it holds plain tuples and numbers, never an
argparse namespace or a ``ToleranceTable``, whose read-only mappings do not pickle). :func:`verify_with` is the
one place that translates it into a :func:`bnfold.validate.verify` call. Importing this module does not import
onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bnfold.validate.inputs import DEFAULT_ITERATIONS
from bnfold.validate.tolerances import ToleranceTable

if TYPE_CHECKING:
    from bnfold.validate.model_source import ModelInput
    from bnfold.validate.report import VerifyReport

# One tolerance override: (output name, or None for every floating output; value).
ToleranceOverride = tuple[str | None, float]


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """How to verify a candidate against its original (see :func:`bnfold.validate.verify` for each field).

    ``atol``/``rtol`` are overrides in the order given (the last one for a target wins): ``(None, value)``
    for every floating output, ``(output name, value)`` for one output; the rest comes from the default table.
    """

    providers: tuple[str, ...] = ("cpu",)
    require_provider: bool = False
    seed: int = 0
    iterations: int = DEFAULT_ITERATIONS
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    dims: tuple[tuple[str, int], ...] = ()
    atol: tuple[ToleranceOverride, ...] = ()
    rtol: tuple[ToleranceOverride, ...] = ()
    load_inputs: str | None = None
    save_inputs: str | None = None
    cuda_tf32: bool = False
    timeout_s: float | None = None

    def tolerances(self) -> ToleranceTable:
        """The default table with :attr:`atol`/:attr:`rtol` applied."""
        fields: dict[str, object] = {}
        for which in ("atol", "rtol"):
            per_output: dict[str, float] = {}
            for name, value in getattr(self, which):
                if name is None:
                    fields[which] = value
                else:
                    per_output[name] = value
            fields[f"output_{which}"] = per_output
        return ToleranceTable(**fields)


def verify_with(
    original: ModelInput,
    candidate: ModelInput,
    options: VerifyOptions,
    *,
    probes: Mapping[str, str] | None = None,
    candidate_label: str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> VerifyReport:
    """Run :func:`bnfold.validate.verify` under ``options`` (``progress``: see :func:`~bnfold.validate.verify`).

    ``candidate_label`` names the candidate in the report (e.g. the final output path when ``candidate`` is
    a staged temporary file).
    """
    from bnfold.validate.verifier import verify  # (imports onnxruntime: only when a run verifies)

    report = verify(
        original,
        candidate,
        providers=options.providers,
        seed=options.seed,
        iterations=options.iterations,
        input_shapes=dict(options.input_shapes) or None,
        dims=dict(options.dims) or None,
        tolerances=options.tolerances(),
        load_inputs=options.load_inputs,
        save_inputs=options.save_inputs,
        cuda_tf32=options.cuda_tf32,
        require_provider=options.require_provider,
        probes=probes,
        timeout_s=options.timeout_s,
        progress=progress,
    )
    if candidate_label is None:
        return report
    return dataclasses.replace(report, candidate=os.fspath(candidate_label))
