"""The Python API: fold and check a model in memory. No printing, no rendering.

Files are folded by :func:`bnfold.workflow.fold_file` (stage → verify → commit), which the CLI uses; these
functions work on a model object and return it, for callers that save it themselves
(:func:`bnfold.files.save_model`).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from bnfold.files.load import ModelInput, as_model
from bnfold.gc_pause import gc_paused
from bnfold.passes import FoldBatchNormPass
from bnfold.report import FoldReport
from bnfold.workflow import FoldOptions

ModelLike = ModelInput  # (the name this module used before bnfold.files.load.ModelInput)


def make_fold_pass(
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    *,
    lower_standalone: bool = False,
) -> FoldBatchNormPass:
    """The fold pass with rules enabled by ``only``/``skip``; unknown rule names raise :class:`UsageError`."""
    return FoldOptions(only=only, skip=skip, lower_standalone=lower_standalone).make_pass()


def fold(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    lower_standalone: bool = False,
    options: FoldOptions | None = None,
) -> tuple[ir.Model, FoldReport]:
    """Fold every foldable BatchNormalization; return the folded model and a report on every BN.

    ``model`` may be a path (loaded lazily, external data memory-mapped), an ``onnx.ModelProto`` or an
    ``onnx_ir.Model``. An ``onnx_ir.Model`` is folded **in place** and returned; pass ``model.clone()`` to
    keep the original. ``only``/``skip`` take rule names (see ``bnfold.passes.rule_names()``).
    ``lower_standalone=True`` replaces every BN that no rule folds by one per-channel ``Mul`` + ``Add``
    (records with rule ``lower_standalone``). ``options`` (a :class:`~bnfold.workflow.FoldOptions`) replaces
    the three keywords and carries the rest.

    A model loaded from a file remembers the file's layout in ``model.meta`` (kept by the fold, not by
    ``model.clone()``): :func:`bnfold.save_model` writes external data when the input had it, even when every
    external tensor was folded.
    """
    if options is None:
        options = FoldOptions(only=only, skip=skip, lower_standalone=lower_standalone)
    fold_pass = options.make_pass()
    with gc_paused():
        result = fold_pass(as_model(model))
    return result.model, result.report


def check(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    options: FoldOptions | None = None,
) -> FoldReport:
    """Which BatchNormalization nodes could still be folded (``report.folded``); the input is not changed."""
    loaded = model.clone() if isinstance(model, ir.Model) else as_model(model)
    return fold(loaded, only=only, skip=skip, options=options)[1]
