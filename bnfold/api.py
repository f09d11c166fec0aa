"""The Python API behind the CLI: fold and check. No printing, no rendering."""

from __future__ import annotations

import os
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from bnfold.errors import UsageError
from bnfold.gc_pause import gc_paused
from bnfold.io import as_model
from bnfold.passes import FoldBatchNormPass
from bnfold.report import FoldReport

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


def make_fold_pass(
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    *,
    lower_standalone: bool = False,
) -> FoldBatchNormPass:
    """The fold pass with rules enabled by ``only``/``skip``; unknown rule names raise :class:`UsageError`."""
    if isinstance(only, str) or isinstance(skip, str):
        raise UsageError("only/skip take a list of rule names, not a single string")
    try:
        return FoldBatchNormPass(only=only, skip=skip, lower_standalone=lower_standalone)
    except ValueError as error:
        raise UsageError(str(error)) from error


def fold(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    lower_standalone: bool = False,
) -> tuple[ir.Model, FoldReport]:
    """Fold every foldable BatchNormalization; return the folded model and a report on every BN.

    ``model`` may be a path (loaded lazily, external data memory-mapped), an ``onnx.ModelProto`` or an
    ``onnx_ir.Model``. An ``onnx_ir.Model`` is folded **in place** and returned; pass ``model.clone()`` to
    keep the original. ``only``/``skip`` take rule names (see ``bnfold.passes.rule_names()``).
    ``lower_standalone=True`` replaces every BN that no rule folds by one per-channel ``Mul`` + ``Add``
    (records with rule ``lower_standalone``).
    """
    fold_pass = make_fold_pass(only, skip, lower_standalone=lower_standalone)
    with gc_paused():
        result = fold_pass(as_model(model))
    return result.model, result.report


def check(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
) -> FoldReport:
    """Which BatchNormalization nodes could still be folded (``report.folded``); the input is not changed."""
    loaded = model.clone() if isinstance(model, ir.Model) else as_model(model)
    return fold(loaded, only=only, skip=skip)[1]
