"""A fuzz worker process (started by :mod:`fuzz.runner`; not meant to be run by hand).

``run`` mode generates cases ``start, start + stride, ...`` and writes one JSON line per event to the file
descriptor ``--fd``: ``{"event": "start", "index": i}`` before a case and ``{"event": "done", ...}`` with its
outcome after it, so that the parent can tell which case hung or killed the process. ``minimise`` mode
shrinks one stored case while it keeps its failure signature and stores the result.

The worker caps its address space (``--memory-mb``) so that a case allocating without bound fails with
``MemoryError`` instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

from fuzz.corpus import generate, load_corpus, read_case, write_case
from fuzz.harness import HANG, PIPELINES, Outcome, run_case, use_small_streaming_thresholds
from fuzz.minimise import minimise
from fuzz.seeds import Case


class _AttemptTimeout(BaseException):
    """Raised by SIGALRM inside a minimisation attempt that runs too long."""


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _quiet() -> None:
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def pipeline_for(index: int) -> str:
    """Case ``i`` goes through pipeline ``i mod 4`` (API, streaming CLI fold, lower_standalone, lower_training)."""
    return PIPELINES[index % len(PIPELINES)]


def run_cases(args: argparse.Namespace) -> int:
    corpus = load_corpus(Path(args.corpus) if args.corpus else None)
    scratch = Path(args.scratch) if args.scratch else None
    with os.fdopen(args.fd, "w", buffering=1) as events:
        index = args.start
        while index < args.stop and time.time() < args.deadline:
            events.write(json.dumps({"event": "start", "index": index}) + "\n")
            base, case = generate(args.seed, index, corpus)
            outcome = run_case(case, scratch, pipeline_for(index))
            events.write(json.dumps({"event": "done", "index": index, "base": base, "outcome": outcome.to_dict()}))
            events.write("\n")
            index += args.stride
    return 0


def _attempt(case: Case, scratch: Path | None, seconds: int, pipeline: str) -> Outcome:
    def on_alarm(signum: int, frame: object) -> None:
        raise _AttemptTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return run_case(case, scratch, pipeline)
    except _AttemptTimeout:
        return Outcome(HANG, signature="hang")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def minimise_case(args: argparse.Namespace) -> int:
    case = read_case(Path(args.case))
    scratch = Path(args.scratch) if args.scratch else None
    finding = json.loads(args.finding)

    pipeline = pipeline_for(int(finding["index"]))

    def still_fails(candidate: Case) -> bool:
        return _attempt(candidate, scratch, args.attempt_timeout, pipeline).signature == finding["signature"]

    smaller = minimise(case, still_fails, budget_seconds=args.budget)
    finding["minimised"] = smaller != case
    write_case(smaller, Path(args.out), finding)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--start", type=int, required=True)
    run.add_argument("--stride", type=int, default=1)
    run.add_argument("--stop", type=int, default=2**62)
    run.add_argument("--deadline", type=float, required=True)
    run.add_argument("--fd", type=int, required=True)
    run.add_argument("--corpus")
    run.set_defaults(action=run_cases)
    shrink = sub.add_parser("minimise")
    shrink.add_argument("--case", required=True)
    shrink.add_argument("--out", required=True)
    shrink.add_argument("--finding", required=True, help="the finding as JSON (its signature must persist)")
    shrink.add_argument("--budget", type=float, default=60.0)
    shrink.add_argument("--attempt-timeout", type=int, default=10)
    shrink.set_defaults(action=minimise_case)
    for mode in (run, shrink):
        mode.add_argument("--scratch")
        mode.add_argument("--memory-mb", type=int, default=4096)
    args = parser.parse_args(argv)
    _limit_memory(args.memory_mb)
    _quiet()
    use_small_streaming_thresholds()
    return args.action(args)


if __name__ == "__main__":
    sys.exit(main())
