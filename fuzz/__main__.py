"""``python -m fuzz --seconds N --seed S [--corpus DIR]``: mutation-fuzz bnfold's load → fold → save path.

Exit status: 0 when no case failed, 1 when any did (crash, hang, checker regression, unreadable output or a
modified input); every new failure is minimised and stored under ``tests/security/regressions/``.
``--replay INDEX`` reruns one case of the campaign ``--seed`` in this process and prints its outcome.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from fuzz.corpus import generate, load_corpus
from fuzz.harness import run_case, use_small_streaming_thresholds
from fuzz.runner import DEFAULT_STORE, Settings, Summary, run_campaign
from fuzz.worker import pipeline_for


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _progress(summary: Summary) -> None:
    counts = ", ".join(f"{status} {count}" for status, count in sorted(summary.counts.items()))
    rate = summary.iterations / summary.seconds if summary.seconds else 0.0
    sys.stderr.write(f"[{summary.seconds:6.0f} s] {summary.iterations} cases ({rate:.0f}/s): {counts}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed; case i is reproducible from it")
    parser.add_argument("--corpus", type=Path, help="extra seed models: *.onnx files or case directories")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--max-iterations", type=int, help="stop after this many cases")
    parser.add_argument("--case-timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space cap of each worker")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="where new findings are stored")
    parser.add_argument("--no-store", action="store_true", help="report findings without storing them")
    parser.add_argument("--scratch", type=Path, help="directory for temporary case files (e.g. /dev/shm)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="run case INDEX of --seed here and print it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replay is not None:
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")
        use_small_streaming_thresholds()
        base, case = generate(args.seed, args.replay, load_corpus(args.corpus))
        outcome = run_case(case, args.scratch, pipeline_for(args.replay))
        _write(json.dumps({"base": base, **outcome.to_dict()}, indent=2))
        return 1 if outcome.failed else 0
    settings = Settings(
        seconds=args.seconds,
        seed=args.seed,
        corpus=args.corpus,
        jobs=max(1, args.jobs),
        case_timeout=args.case_timeout,
        memory_mb=args.memory_mb,
        store=None if args.no_store else args.store,
        max_iterations=args.max_iterations,
        scratch=args.scratch,
    )
    summary = run_campaign(settings, _progress)
    counts = ", ".join(f"{status} {count}" for status, count in sorted(summary.counts.items()))
    _write(f"fuzz seed {summary.seed}: {summary.iterations} cases in {summary.seconds:.0f} s ({counts})")
    for finding in summary.findings.values():
        where = f" → {finding.stored}" if finding.stored else ""
        _write(f"  {finding.status}: {finding.signature} ×{finding.count} (case {finding.index}){where}")
        _write(f"      {finding.message[:300]}")
    if args.json:
        document = {
            "seed": summary.seed,
            "iterations": summary.iterations,
            "seconds": round(summary.seconds, 3),
            "counts": dict(summary.counts),
            "findings": [finding.to_dict() for finding in summary.findings.values()],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
