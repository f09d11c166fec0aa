"""Fold many model files with a process pool; one :class:`~bnfold.workflow.FoldOutcome` per model, as they finish.

Each model goes through the same workflow as a single model (:func:`bnfold.workflow.fold_file`: stage, verify
when :class:`~bnfold.validate.options.VerifyOptions` are given, commit unless verification failed), with the
same frozen options, so batch and single mode write the same files and agree on exit codes. Worker processes
are started once (``forkserver`` with the workflow, and the verifier when verifying, pre-imported) and reused
for every model they take, so imports and onnxruntime's setup are paid once per worker, not once per model.
Nothing here prints.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError, ExitCode, UsageError
from bnfold.workflow import FoldOptions, FoldOutcome, fold_file

if TYPE_CHECKING:
    from bnfold.validate.options import VerifyOptions

# What the worker server imports before forking workers; the verifier's modules only when a run verifies.
WORKFLOW_MODULES = ("bnfold.batch", "bnfold.workflow")
VERIFY_MODULES = ("bnfold.validate.options", "bnfold.validate.verifier")


@dataclasses.dataclass(frozen=True)
class FoldJob:
    """Fold ``source`` into ``destination`` (``destination == source`` folds in place); ``keep_failed``: where
    to save the candidate when verification fails (``None``: nowhere)."""

    source: str
    destination: str
    keep_failed: str | None = None

    @property
    def in_place(self) -> bool:
        return os.path.abspath(self.source) == os.path.abspath(self.destination)


def run_job(job: FoldJob, options: FoldOptions, verify: VerifyOptions | None = None) -> FoldOutcome:
    """:func:`~bnfold.workflow.fold_file` for one job; an error becomes the outcome's ``error`` and ``exit_code``
    (one broken model must not stop the batch). The outcome is detached (picklable)."""
    started = time.perf_counter()
    try:
        return fold_file(job.source, job.destination, options, verify, keep_failed=job.keep_failed).detached()
    except BnfoldError as error:
        code, message = int(error.exit_code), str(error)
    except Exception as error:
        code, message = int(ExitCode.FAILED), f"internal error: {type(error).__name__}: {error}"
    return FoldOutcome(job.source, job.destination, code, time.perf_counter() - started, error=message)


def fold_jobs(
    jobs: Iterable[FoldJob],
    options: FoldOptions,
    verify: VerifyOptions | None = None,
    *,
    workers: int,
) -> Iterator[FoldOutcome]:
    """Fold every job, ``workers`` at a time, yielding outcomes as they complete.

    ``workers == 1`` (or a single job) runs in this process.
    """
    jobs = list(jobs)
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield run_job(job, options, verify)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*WORKFLOW_MODULES, *(VERIFY_MODULES if verify is not None else ())])
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(run_job, job, options, verify): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except Exception as error:  # the worker died (killed, out of memory): report, go on
                    job = futures[future]
                    message = f"worker failed: {type(error).__name__}: {error}"
                    yield FoldOutcome(job.source, job.destination, int(ExitCode.FAILED), 0.0, error=message)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def output_paths(sources: Iterable[str], directory: str | os.PathLike) -> list[str]:
    """``directory/<file name>`` for each source; :class:`~bnfold.errors.UsageError` on clashing names or when
    an output would be its own input."""
    directory = Path(directory)
    outputs: dict[str, str] = {}
    for source in sources:
        name = Path(source).name
        if name in outputs:
            raise UsageError(f"{outputs[name]} and {source} would both be written to {directory / name}")
        outputs[name] = source
        target = directory / name
        if target.exists() and os.path.samefile(target, source):
            raise UsageError(f"{target}: the output would overwrite the input (use --in-place to mean it)")
    return [os.fspath(directory / Path(source).name) for source in sources]


def batch_exit_code(outcomes: Iterable[FoldOutcome]) -> int:
    """0 when every model succeeded, else the largest exit code among them (see ``bnfold --help``)."""
    return max((outcome.exit_code for outcome in outcomes), default=int(ExitCode.OK))
