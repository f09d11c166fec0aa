"""The fold workflow: one model file in, one staged fold, verified, committed (or kept as failed), one outcome.

:func:`fold_file` is the only place that decides what a fold run writes::

    stage   fold ``source`` into hidden files beside ``destination`` (memory bounded by a few tensors)
    verify  run the staged candidate against the original (when :class:`VerifyOptions` are given)
    commit  rename the staged files into place, unless verification FAILED (a provider that was only
            SKIPPED is not a failure; ``require_provider`` turns a missing provider into an error instead)
    keep    on a failure, optionally save the candidate beside the output as ``<stem>.failed.onnx``

The CLI's single-model mode calls it once; batch mode (:mod:`bnfold.batch`) calls it in worker processes with
the same options, so both modes write the same files and end with the same exit code. Options are frozen
dataclasses (picklable); nothing here imports the CLI or prints.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from bnfold.errors import ExitCode, UsageError
from bnfold.files import serialize
from bnfold.files.load import external_files, files_size_bytes, load_model, open_lazily
from bnfold.files.output_plan import MODEL_OUTPUT, OutputPlan
from bnfold.files.paths import is_same_file
from bnfold.files.serialize import EXTERNAL_DATA_THRESHOLD_BYTES
from bnfold.files.staging import StagedModel, create_staging, save_model, writing
from bnfold.files.writer import DataFile
from bnfold.gc_pause import gc_paused
from bnfold.passes import DEFAULT_RULES, FoldBatchNormPass, FoldedCallback, select_rules
from bnfold.report import BatchNormRecord, FoldReport

if TYPE_CHECKING:
    from bnfold.validate.options import VerifyOptions
    from bnfold.validate.report import VerifyReport


def _rule_names(value: Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise UsageError("only/skip take a list of rule names, not a single string")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """What the fold pass does (see :class:`~bnfold.passes.FoldBatchNormPass`); rule names are checked here.

    ``only``/``skip``: rule names (``bnfold.passes.rule_names()``); an unknown name raises
    :class:`~bnfold.errors.UsageError` when the options are made, before any model is read.
    ``lower_standalone``: replace every BN no rule folds by a per-channel ``Mul`` + ``Add``.
    ``freeze_initializer_inputs``: first remove initializers from the main graph's inputs (IR >= 4), so BNs
    whose parameters were overridable defaults fold. ``allow_precision_loss``: fold even where the folded
    fp16/bf16 weights would round far worse than the original (the pass's ``precision_guard`` off).
    """

    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    lower_standalone: bool = False
    freeze_initializer_inputs: bool = False
    allow_precision_loss: bool = False

    def __post_init__(self) -> None:
        only, skip = _rule_names(self.only), _rule_names(self.skip)
        object.__setattr__(self, "only", only)
        object.__setattr__(self, "skip", skip)
        try:
            select_rules(DEFAULT_RULES, only, skip)
        except ValueError as error:
            raise UsageError(str(error)) from error

    def make_pass(self, on_folded: FoldedCallback | None = None) -> FoldBatchNormPass:
        """The fold pass these options describe (``on_folded``: called after each BN folds)."""
        return FoldBatchNormPass(
            only=self.only,
            skip=self.skip,
            lower_standalone=self.lower_standalone,
            freeze_initializer_inputs=self.freeze_initializer_inputs,
            precision_guard=not self.allow_precision_loss,
            on_folded=on_folded,
        )


# --- stage ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StagedFold:
    """A folded model written under a temporary directory (see :class:`~bnfold.files.staging.StagedModel`)."""

    staged: StagedModel
    report: FoldReport
    size_before: int
    read_files: frozenset[Path] = frozenset()  # the resolved files the source model was read from


def stage_fold(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    options: FoldOptions | None = None,
    *,
    external_data: bool | None = None,
) -> StagedFold:
    """Fold the model file ``source`` into a staged ``destination`` with memory bounded by a few tensors.

    ``external_data=None`` keeps the source's layout (external data when the source has any). The input
    files are never written; the output data file never takes the name of a file the input reads.
    Commit (or discard) ``result.staged``; use it as a context manager. The folded model itself is not kept,
    so nothing of it stays in memory while the staged files are verified.

    With external-data output each folded tensor is moved to the data file as soon as its BatchNormalization
    folds (a deferred weight is then computed block by block by the writer threads), so a folded weight never
    exists whole in memory.

    Raises:
        InvalidModelError: the source cannot be read. UsageError: missing output directory, an output that
        would overwrite a file the model is read from.
    """
    options = options or FoldOptions()
    with gc_paused():  # (see bnfold.gc_pause: collections would traverse the whole graph, often)
        model = open_lazily(source)
        read = external_files(model)  # (one walk over the graph, shared by the three uses below)
        itself = Path(os.path.realpath(source))
        size_before = files_size_bytes(source, read_files=read)
        for file in read - {itself}:  # (replacing the model file itself is an in-place fold)
            if is_same_file(destination, file):
                raise UsageError(f"{destination}: the output would overwrite a file the model is read from: {file}")
        if external_data is None:
            external_data = bool(read - {itself})  # external data in other files (not a lazily read .onnx)
        staged = create_staging(model, destination, external_data=external_data, read_files=read)
        try:
            with writing(destination):
                if staged.data_name is not None:
                    data = DataFile(staged.path.parent / staged.data_name)
                    try:
                        result = options.make_pass(on_folded=_spill_to(data))(model)
                        serialize.write_model(result.model, staged.path, data)
                    finally:
                        data.close()
                    if data.stored == 0:  # every tensor small enough to stay in the model: no empty data file
                        staged.drop_data()
                else:
                    result = options.make_pass()(model)
                    serialize.write_model(result.model, staged.path)
                    if not result.report.folded:  # nothing folded: the output is the input's bytes when unchanged
                        serialize.keep_source_bytes(source, staged.path)
        except BaseException:
            staged.discard()
            raise
    return StagedFold(staged=staged, report=result.report, size_before=size_before, read_files=frozenset(read))


def _spill_to(data: DataFile) -> FoldedCallback:
    """A fold callback that moves each folded tensor to ``data`` right after its BatchNormalization folds.

    Only the nodes the fold rewrote are looked at, so the extra work is constant per BN. A folded tensor
    elsewhere is still written correctly, by :func:`~bnfold.files.serialize.write_model`.
    """

    def spill(record: BatchNormRecord, rewritten: tuple[ir.Node, ...]) -> None:
        for node in rewritten:
            if node.graph is None:
                continue
            for value in node.inputs:
                tensor = value.const_value if value is not None and value.is_initializer() else None
                if type(tensor) is ir.Tensor and tensor.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES:
                    value.const_value = data.store(tensor)

    return spill


# --- the whole run for one file ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FoldOutcome:
    """What happened to one model file. ``written`` is ``None`` when nothing was committed.

    ``verification`` is the live report (``None`` without verification, and after :meth:`detached`, which is
    what crosses a process boundary); ``verify_verdict`` (``"passed"``, ``"failed"``, ``"skipped"``) and
    ``verify_document`` (the report's ``to_dict()``) stay. ``error``: the one-line reason of a failure.
    ``kept_data``: after an in-place write, the input's data files the new model no longer reads; they are
    left in place (never deleted: a copy of the model may still read them).
    """

    source: str
    destination: str
    exit_code: int
    seconds: float
    report: FoldReport | None = None
    written: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    kept_failed: str | None = None
    kept_data: tuple[str, ...] = ()
    verify_verdict: str | None = None
    verify_document: dict[str, Any] | None = None
    verification: VerifyReport | None = dataclasses.field(default=None, compare=False, repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    def detached(self) -> FoldOutcome:
        """This outcome without the live verification report (which does not pickle)."""
        return dataclasses.replace(self, verification=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of this model (``bnfold fold --json``)."""
        return {
            "input": self.source,
            "output": self.written,
            "exit_code": self.exit_code,
            "error": self.error,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "seconds": round(self.seconds, 6),
            "kept_failed": self.kept_failed,
            "kept_data": list(self.kept_data),
            "fold": self.report.to_dict() if self.report is not None else None,
            "verify": self.verify_document,
        }


def fold_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    options: FoldOptions | None = None,
    verify: VerifyOptions | None = None,
    *,
    keep_failed: str | os.PathLike | None = None,
    plan: OutputPlan | None = None,
) -> FoldOutcome:
    """Fold ``source`` into ``destination`` (the same path: in place): stage → verify → commit → outcome.

    ``verify=None`` writes without verifying. The staged model is committed unless verification FAILED; then
    nothing is written at ``destination``, and with ``keep_failed`` the candidate is saved there instead.
    After an in-place commit the input's previous data files, which the new model no longer reads, are kept
    (``FoldOutcome.kept_data`` names them): bnfold deletes no file it did not just write.

    ``plan``: every path the run reads and writes (default: :func:`fold_plan`; the CLI adds its reports). It is
    checked before anything is written, again with the model's external data files once they are known.

    Raises:
        BnfoldError: the input cannot be read (3), bad options or paths (2), a required provider is missing
            (4); nothing is written then. (:func:`bnfold.batch.run_job` turns these into outcomes.)
    """
    started = time.perf_counter()
    source, destination = os.fspath(source), os.fspath(destination)
    plan = plan or fold_plan(source, destination, verify, keep_failed)
    plan.check()
    folded = stage_fold(source, destination, options)
    verification = None
    written = size_after = kept = None
    kept_data: tuple[Path, ...] = ()
    with folded.staged as staged:
        if staged.data_name is not None:
            plan.write(Path(destination).parent / staged.data_name, f"the external data of {destination}")
        plan.check()
        plan.check_reads(folded.read_files)
        if verify is not None:
            from bnfold.validate.options import verify_with  # (onnxruntime: only when a run verifies)

            probes = folded.report.probe_tensors()
            verification = verify_with(source, staged.path, verify, probes=probes, candidate_label=destination)
        if verification is None or not verification.failed:  # a SKIPPED provider is not a failure
            size_after = staged.size_bytes()
            staged.commit()
            written = destination
            kept_data = staged.kept_data
        elif keep_failed is not None:
            save_model(load_model(staged.path), keep_failed)
            kept = os.fspath(keep_failed)
    failed = verification is not None and verification.failed
    return FoldOutcome(
        source=source,
        destination=destination,
        exit_code=int(ExitCode.FAILED if failed else ExitCode.OK),
        seconds=time.perf_counter() - started,
        report=folded.report,
        written=written,
        size_before=folded.size_before,
        size_after=size_after,
        kept_failed=kept,
        kept_data=tuple(os.fspath(path) for path in kept_data),
        verify_verdict=None if verification is None else verification.verdict.value,
        verify_document=None if verification is None else verification.to_dict(),
        verification=verification,
        error="verification failed; nothing written" if failed else None,
    )


def fold_plan(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    verify: VerifyOptions | None = None,
    keep_failed: str | os.PathLike | None = None,
    *,
    in_place: bool | None = None,
) -> OutputPlan:
    """The output plan of one :func:`fold_file` run: the model and ``--load-inputs`` read; the output,
    ``--save-inputs`` and the ``--keep-failed`` model written. ``in_place``: the output may replace the input
    (default: when it is the same file; the CLI asks for ``--in-place``)."""
    if in_place is None:
        in_place = is_same_file(source, destination)
    plan = OutputPlan().read(source, "the input")
    plan.write(destination, MODEL_OUTPUT, replaces=source if in_place else None, hint=" (use --in-place to mean it)")
    plan.write(keep_failed, "--keep-failed")
    if verify is not None:
        plan.read(verify.load_inputs, "the --load-inputs file")
        plan.write(verify.save_inputs, "--save-inputs")
    return plan


def default_failed_path(output: str | os.PathLike) -> Path:
    """Where ``--keep-failed`` saves a model that failed verification: ``<stem>.failed.onnx`` beside ``output``."""
    output = Path(output)
    name = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{name}.failed.onnx")
