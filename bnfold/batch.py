"""Fold many model files with a process pool; one :class:`BatchResult` per model, in completion order.

Each model goes through the streaming fold (:func:`bnfold.streaming.fold_to_staged`): fold into a staged
output, verify the staged files when a verifier is given, commit only if verification passed. Worker processes
are started once (``forkserver`` with bnfold pre-imported) and reused for every model they take, so the import
of bnfold, onnxruntime and the verifier's setup is paid once per worker, not once per model. Nothing here prints.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from bnfold import streaming
from bnfold.errors import BnfoldError, ExitCode, UsageError
from bnfold.report import FoldReport


class Verifier(Protocol):
    """Compares ``original`` with the staged ``candidate``; ``probes`` maps tensors to compare to node names.

    Must be picklable (a module-level function or a ``functools.partial`` of one) to run in a worker. The
    returned report needs ``passed`` and ``to_dict()``; only those cross the process boundary.
    """

    def __call__(self, original: str, candidate: str, probes: Mapping[str, str]) -> Any: ...


@dataclasses.dataclass(frozen=True)
class FoldJob:
    """Fold ``source`` into ``destination`` (``destination == source`` folds in place)."""

    source: str
    destination: str
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    lower_standalone: bool = False

    @property
    def in_place(self) -> bool:
        return os.path.abspath(self.source) == os.path.abspath(self.destination)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What happened to one model. ``destination`` is ``None`` when nothing was written."""

    job: FoldJob
    exit_code: int
    seconds: float
    report: FoldReport | None = None
    destination: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    verified: bool | None = None  # None: not verified
    verification: dict[str, Any] | None = None  # the verifier report's to_dict()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.job.source,
            "output": self.destination,
            "exit_code": self.exit_code,
            "error": self.error,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "seconds": round(self.seconds, 6),
            "fold": self.report.to_dict() if self.report is not None else None,
            "verify": self.verification,
        }


def fold_job(job: FoldJob, verifier: Verifier | None = None) -> BatchResult:
    """Fold one model: stage, verify (if ``verifier``), commit when verification passed. Never raises a
    :class:`~bnfold.errors.BnfoldError`: it becomes the result's ``error`` and ``exit_code``."""
    started = time.perf_counter()
    try:
        folded = streaming.fold_to_staged(
            job.source, job.destination, only=job.only, skip=job.skip, lower_standalone=job.lower_standalone
        )
        verification = None
        with folded.staged as staged:
            if verifier is not None:
                probes = folded.report.probe_tensors()
                verification = verifier(job.source, os.fspath(staged.path), probes)
            passed = verification is None or verification.passed
            size_after = staged.size_bytes() if passed else None
            if passed:
                staged.commit()
                if job.in_place:
                    staged.remove_superseded_data()
        return BatchResult(
            job=job,
            exit_code=ExitCode.OK if passed else ExitCode.FAILED,
            seconds=time.perf_counter() - started,
            report=folded.report,
            destination=job.destination if passed else None,
            size_before=folded.size_before,
            size_after=size_after,
            verified=None if verification is None else not verification.failed,
            verification=None if verification is None else verification.to_dict(),
            error=None if passed else "verification failed; nothing written",
        )
    except BnfoldError as error:
        return BatchResult(job, int(error.exit_code), time.perf_counter() - started, error=str(error))
    except Exception as error:  # one broken model must not stop the batch
        message = f"internal error: {type(error).__name__}: {error}"
        return BatchResult(job, ExitCode.FAILED, time.perf_counter() - started, error=message)


def fold_jobs(
    jobs: Iterable[FoldJob],
    *,
    workers: int,
    verifier: Verifier | None = None,
    preload: Iterable[str] = (),
) -> Iterator[BatchResult]:
    """Fold every job, ``workers`` at a time, yielding results as they complete.

    ``workers == 1`` (or a single job) runs in this process. ``preload`` names modules the worker server
    imports once before forking workers (for instance the verifier's module).
    """
    jobs = list(jobs)
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield fold_job(job, verifier)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bnfold.batch", *preload])
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(fold_job, job, verifier): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except Exception as error:  # the worker died (killed, out of memory): report, go on
                    job = futures[future]
                    message = f"worker failed: {type(error).__name__}: {error}"
                    yield BatchResult(job, ExitCode.FAILED, 0.0, error=message)
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


def batch_exit_code(results: Iterable[BatchResult]) -> int:
    """0 when every model succeeded, else the largest exit code among them (see ``bnfold --help``)."""
    return max((result.exit_code for result in results), default=int(ExitCode.OK))
