"""Fold many model files with a process pool; one :class:`~bnfold.workflow.FoldOutcome` per model, as they finish.

Each model goes through the same workflow as a single model (:func:`bnfold.workflow.fold_file`: stage, verify
when :class:`~bnfold.validate.options.VerifyOptions` are given, commit unless verification failed), with the
same frozen options, so batch and single mode write the same files and agree on exit codes. Worker processes
are started once (``forkserver`` with the workflow, and the verifier when verifying, pre-imported) and reused
for every model they take, so imports and onnxruntime's setup are paid once per worker, not once per model.
Nothing here prints.

Signals: each worker turns SIGTERM and SIGINT into an exception while it works on a model
(:func:`_worker_started`), so its staged files are removed as they are in single mode, then the worker exits with
128 + the signal number; an idle worker exits at once. So ``kill -TERM -<process group>`` (or Ctrl-C) leaves no
hidden staging folder. When the parent itself is interrupted it stops the workers the same way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import signal
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
        code, message = int(ExitCode.INTERNAL), f"internal error: {type(error).__name__}: {error}"
    return FoldOutcome(job.source, job.destination, code, time.perf_counter() - started, error=message)


class WorkerInterrupted(KeyboardInterrupt):
    """Raised in a worker by SIGTERM or SIGINT while it folds a model: unwinds like Ctrl-C (staging removed)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


# Whether this worker is folding a model now (then a signal unwinds it; otherwise the worker just exits).
_busy = False


def _on_signal(signal_number: int, frame: object) -> None:
    if not _busy:
        os._exit(128 + signal_number)
    # Unwind once: a second signal (``kill -TERM -<group>`` reaches the worker directly, then the parent forwards
    # one) must not interrupt the removal of the staged files.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    raise WorkerInterrupted(signal_number)


def _worker_started() -> None:
    """The pool's initializer: SIGTERM and SIGINT unwind the current job (see the module docstring)."""
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _on_signal)


def _run_in_worker(job: FoldJob, options: FoldOptions, verify: VerifyOptions | None) -> FoldOutcome:
    """:func:`run_job` in a worker process; a signal ends the worker once the job's staged files are removed.

    (The pool would otherwise catch the interrupt, report it and hand the worker the next model.)
    """
    global _busy
    try:
        _busy = True
        return run_job(job, options, verify)
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        os._exit(128 + number)
    finally:
        _busy = False


# How long the parent waits for an interrupted worker to remove its staged files and exit.
WORKER_STOP_SECONDS = 30.0


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Send SIGTERM to the pool's workers and wait (at most ``WORKER_STOP_SECONDS``) until they have removed
    their staged files and exited, so that nothing is left behind once this process exits."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if process.is_alive():
                process.terminate()
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
            process.join(max(0.0, deadline - time.monotonic()))


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
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=context, initializer=_worker_started
    ) as pool:
        futures = {pool.submit(_run_in_worker, job, options, verify): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except Exception as error:  # the worker died (killed, out of memory): report, go on
                    job = futures[future]
                    message = f"worker failed: {type(error).__name__}: {error}"
                    yield FoldOutcome(job.source, job.destination, int(ExitCode.FAILED), 0.0, error=message)
        except BaseException as error:
            for future in futures:
                future.cancel()
            if not isinstance(error, Exception):  # Ctrl-C, SIGTERM, the batch abandoned: the workers stop too
                _stop_workers(pool)
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
