"""``recalibrate``: re-estimate the running statistics of every inference-mode BatchNormalization from data.

Two modes (statistics from :mod:`bnfold.recalibration.statistics`, graphs from :mod:`bnfold.recalibration.graph`):

- default (pooled): each BN gets the exact mean and variance of its input X over all the data, as the
  *recalibrated* model computes X (upstream BNs in inference mode with their new statistics). BNs are processed
  in generations, one pass over the data per generation (a plain ResNet chain: about one generation per BN on
  the longest path); every pass runs one reused onnxruntime session (optimisations off) that is fed the
  current statistics. Independent of how the data is split into batches. ``convention="onnx"`` stores the
  biased variance ``M2/n``, ``"torch"`` the unbiased ``M2/(n − 1)``.
- ``match_torch=True``: what ``torch.optim.swa_utils.update_bn`` computes. Every BN normalises with its batch
  statistics (train mode), so one pass suffices; each BN stores the cumulative average of its per-batch means
  and unbiased per-batch variances (``momentum=None``). Depends on the batch split, as update_bn does;
  ``convention`` does not apply (the variance is torch's unbiased one).

Memory: one batch of data and its BN inputs at a time, plus O(channels) statistics per BN.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError, UsageError, one_line
from bnfold.files.load import ModelInput, as_model
from bnfold.passes.graph_edit import NameAllocator
from bnfold.recalibration.data import NpzBatches
from bnfold.recalibration.graph import (
    CalibrationModel,
    Target,
    find_targets,
    generations,
    pooled_model,
    training_model,
    write_statistics,
)
from bnfold.recalibration.statistics import PooledStatistics, TorchAverage
from bnfold.validate.inputs import input_specs
from bnfold.validate.model_source import load_model_source
from bnfold.validate.sessions import CPU, Session, make_session

Batches = Iterable[Mapping[str, np.ndarray]]
# progress(batches done, total batches or None when the data has no len())
ProgressCallback = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class RecalibrationRecord:
    """What happened to one BatchNormalization.

    ``status`` is ``"recalibrated"`` or ``"skipped"`` (then ``reason`` says why). For recalibrated BNs:
    ``generation`` (pass it was measured in, 0 in match_torch mode), ``channels``, ``elements`` (values per
    channel seen), ``max_mean_change`` (max |new − old| of the mean) and ``max_var_ratio`` (max of
    new/old and old/new variance; ``inf`` when one side is 0).
    """

    node: str
    status: Literal["recalibrated", "skipped"]
    reason: str | None = None
    generation: int | None = None
    channels: int | None = None
    elements: int | None = None
    max_mean_change: float | None = None
    max_var_ratio: float | None = None


@dataclasses.dataclass(frozen=True)
class RecalibrationReport:
    """The outcome of :func:`recalibrate`: one record per BatchNormalization, and the work done."""

    records: tuple[RecalibrationRecord, ...]
    mode: Literal["pooled", "match_torch"]
    convention: Literal["onnx", "torch"]
    passes: int
    batches: int

    @property
    def recalibrated(self) -> tuple[RecalibrationRecord, ...]:
        return tuple(record for record in self.records if record.status == "recalibrated")

    @property
    def skipped(self) -> tuple[RecalibrationRecord, ...]:
        return tuple(record for record in self.records if record.status == "skipped")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def recalibrate(
    model: ModelInput,
    batches: Batches | str | os.PathLike,
    *,
    convention: Literal["onnx", "torch"] = "onnx",
    match_torch: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[ir.Model, RecalibrationReport]:
    """Replace the running mean/var of every inference-mode main-graph BN by statistics measured on ``batches``.

    Args:
        model: a path, ``onnx.ModelProto`` or ``onnx_ir.Model``; an ``ir.Model`` is updated **in place** and
            returned (existing tensors are never modified: new ones replace them).
        batches: dicts ``{input name: array}``, one per batch, or a path to an ``.npz`` file / directory of
            them (:class:`~bnfold.recalibration.data.NpzBatches`). The pooled mode iterates it once per
            generation, so it must be re-iterable (a list, or an object whose ``__iter__`` starts over), not a
            one-shot iterator, when the model has more than one generation.
        convention: ``"onnx"`` (biased variance) or ``"torch"`` (unbiased); pooled mode only.
        match_torch: reproduce ``torch.optim.swa_utils.update_bn`` (see the module docstring).
        progress: called after every batch with ``(batches done, total or None)`` over all passes.

    Raises:
        UsageError: bad arguments or data (missing, unknown or mistyped inputs; a batch onnxruntime rejects;
            too few values per channel; a one-shot iterator where several passes are needed).
        InvalidModelError: unreadable model.
        BnfoldError: the measured statistics are not finite (NaN or Inf in the activations).
    """
    if convention not in ("onnx", "torch"):
        raise UsageError(f"convention must be 'onnx' or 'torch', got {convention!r}")
    if isinstance(batches, (str, os.PathLike)):
        batches = NpzBatches(batches)
    model = as_model(model)
    targets, skipped = find_targets(model)
    records = {target.position: None for target in targets}
    if match_torch:
        results, passes, count = _measure_match_torch(model, targets, batches, progress)
        generation_of = [0] * len(targets)
    else:
        generation_of = generations(model, targets)
        results, passes, count = _measure_pooled(model, targets, generation_of, batches, convention, progress)
    nodes = list(model.graph)
    target_nodes = [nodes[target.position] for target in targets]  # before any write changes positions
    names = NameAllocator(model)
    for index, (target, node) in enumerate(zip(targets, target_nodes, strict=True)):
        mean, var, elements = results[index]
        new_mean, new_var = _cast_checked(target, mean, var)
        write_statistics(model, node, target, new_mean, new_var, names)
        records[target.position] = _record(target, new_mean, new_var, generation_of[index], elements)
    report = RecalibrationReport(
        records=(*records.values(), *(RecalibrationRecord(s.name, "skipped", s.reason) for s in skipped)),
        mode="match_torch" if match_torch else "pooled",
        convention="torch" if match_torch else convention,
        passes=passes,
        batches=count,
    )
    return model, report


def _measure_pooled(
    model: ir.Model,
    targets: list[Target],
    generation_of: list[int],
    batches: Batches,
    convention: str,
    progress: ProgressCallback | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], int, int]:
    if not targets:
        return [], 0, 0
    calibration = pooled_model(model, targets)
    runner = _Runner(calibration, batches, progress, passes=max(generation_of) + 1)
    current = [(target.mean, target.var) for target in targets]
    results: list = [None] * len(targets)
    for generation in range(runner.passes):
        members = [index for index, g in enumerate(generation_of) if g == generation]
        accumulators = {index: PooledStatistics(targets[index].channels) for index in members}
        fed = {
            name: array
            for pair, stats in zip(calibration.statistic_inputs, current, strict=True)
            for name, array in zip(pair, stats, strict=True)
        }
        for activations in runner.run_pass(members, fed):
            for index, x in activations.items():
                _add(accumulators[index], x, targets[index], runner)
        for index, accumulator in accumulators.items():
            mean = accumulator.mean
            var = _variance(accumulator, targets[index], convention)
            results[index] = (mean, var, accumulator.count)
            current[index] = _cast_checked(targets[index], mean, var)
    return results, runner.passes, runner.batch_count


def _variance(accumulator: PooledStatistics, target: Target, convention: str) -> np.ndarray:
    try:
        return accumulator.variance(unbiased=convention == "torch")
    except UsageError as error:
        raise UsageError(f"BatchNormalization {target.name!r}: {error}") from error


def _measure_match_torch(
    model: ir.Model, targets: list[Target], batches: Batches, progress: ProgressCallback | None
) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], int, int]:
    if not targets:
        return [], 0, 0
    runner = _Runner(training_model(model, targets), batches, progress, passes=1)
    accumulators = [TorchAverage(target.channels) for target in targets]
    for activations in runner.run_pass(list(range(len(targets))), {}):
        for index, x in activations.items():
            _add(accumulators[index], x, targets[index], runner)
    return [(a.mean, a.var, a.count) for a in accumulators], 1, runner.batch_count


def _add(accumulator: PooledStatistics | TorchAverage, x: np.ndarray, target: Target, runner: _Runner) -> None:
    try:
        accumulator.add(x)
    except UsageError as error:
        raise UsageError(f"{runner.label}: BatchNormalization {target.name!r}: {error}") from error


class _Runner:
    """One onnxruntime session (CPU, optimisations off) over the calibration model, reused for every batch."""

    def __init__(
        self, calibration: CalibrationModel, batches: Batches, progress: ProgressCallback | None, *, passes: int
    ) -> None:
        self.calibration = calibration
        self.batches = batches
        self.progress = progress
        self.passes = passes
        self.batch_count = 0
        self.label = "batch 0"  # the batch being processed, for messages
        self._done = 0
        if passes > 1 and iter(batches) is batches:
            raise UsageError(
                f"the model needs {passes} passes over the data (one per BN generation); pass a list or a "
                "re-iterable of batches, not a one-shot iterator"
            )
        source = load_model_source(calibration.model)
        fed = {name for pair in calibration.statistic_inputs for name in pair}
        self.specs = [spec for spec in input_specs(source.proto) if spec.name not in fed]
        if isinstance(batches, NpzBatches):
            batches.expect(self.specs)  # each file's member headers are checked against these before reading
        try:
            self.session: Session = make_session(source, CPU)
        except Exception as error:
            raise BnfoldError(
                f"onnxruntime cannot load the model prepared for calibration ({one_line(error)})"
            ) from error
        try:
            self.total: int | None = len(batches) * passes  # type: ignore[arg-type]
        except TypeError:
            self.total = None

    def run_pass(self, members: list[int], statistics: Mapping[str, np.ndarray]):
        """Yield ``{target index: X}`` for ``members``, one dict per batch."""
        outputs = sorted({self.calibration.x_outputs[i] for i in members if not self.calibration.x_is_input[i]})
        count = 0
        for number, batch in enumerate(self.batches):
            label = f"batch {number}"
            if isinstance(self.batches, NpzBatches):
                label += f" ({self.batches.files[number]})"
            self.label = label
            feeds = self._checked_feeds(label, batch)
            try:
                values = self.session.run({**feeds, **statistics}, outputs) if outputs else {}
            except BnfoldError:
                raise
            except Exception as error:
                raise UsageError(f"{label}: onnxruntime cannot run the model on it ({one_line(error)})") from error
            values.update(feeds)
            yield {index: values[self.calibration.x_outputs[index]] for index in members}
            count += 1
            self._done += 1
            if self.progress is not None:
                self.progress(self._done, self.total)
        if count == 0:
            raise UsageError("no calibration batches: the data is empty")
        self.batch_count = count

    def _checked_feeds(self, label: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(batch, Mapping):
            raise UsageError(f"{label}: expected a mapping of input name to array, got {type(batch).__name__}")
        names = [spec.name for spec in self.specs]
        missing = [name for name in names if name not in batch]
        unknown = sorted(set(batch) - set(names))
        if missing or unknown:
            parts = [f"missing input(s) {', '.join(missing)}"] if missing else []
            parts += [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
            raise UsageError(f"{label}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
        feeds = {}
        for spec in self.specs:
            array = np.asarray(batch[spec.name])
            if spec.dtype == "bfloat16" and array.dtype == np.uint16:
                array = array.view(ml_dtypes.bfloat16)
            if array.dtype.name != spec.dtype:
                raise UsageError(f"{label}: input {spec.name!r} is {array.dtype.name}, the model takes {spec.dtype}")
            feeds[spec.name] = array
        return feeds


def _cast_checked(target: Target, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The statistics in the old tensors' dtypes; BnfoldError when they are not finite there."""
    new_mean, new_var = mean.astype(target.mean.dtype), var.astype(target.var.dtype)
    if not (np.all(np.isfinite(new_mean.astype(np.float64))) and np.all(np.isfinite(new_var.astype(np.float64)))):
        raise BnfoldError(
            f"BatchNormalization {target.name!r}: the measured statistics are not finite in {target.mean.dtype} "
            "(NaN or Inf in its input, or beyond the dtype's range)"
        )
    return new_mean, new_var


def _record(target: Target, mean: np.ndarray, var: np.ndarray, generation: int, elements: int) -> RecalibrationRecord:
    old_mean, old_var = target.mean.astype(np.float64), target.var.astype(np.float64)
    new_mean, new_var = mean.astype(np.float64), var.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(new_var / old_var, old_var / new_var)
    ratio = np.where(new_var == old_var, 1.0, ratio)
    return RecalibrationRecord(
        node=target.name,
        status="recalibrated",
        generation=generation,
        channels=target.channels,
        elements=elements,
        max_mean_change=float(np.max(np.abs(new_mean - old_mean), initial=0.0)),
        max_var_ratio=float(np.max(np.nan_to_num(ratio, nan=np.inf), initial=1.0)),
    )
