"""``bnfold [fold] MODEL``: fold, write atomically, verify (unless --no-verify), summarise.

Batch mode: ``bnfold fold A.onnx B.onnx DIR/ -j N`` folds every model into ``DIR`` with ``N`` worker processes
(``--in-place`` instead of ``DIR`` replaces each input), prints one line per model and a total, and shows a
progress bar when stdout is a terminal and the work lasts more than about a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from bnfold import batch
from bnfold.cli.arg_types import comma_list, positive_int
from bnfold.cli.render import (
    kept_data_line,
    make_console,
    render_batch_outcome,
    render_batch_total,
    render_failure_line,
    render_fold_records,
    render_fold_summary,
    with_progress,
    write_json,
)
from bnfold.errors import ExitCode, UsageError
from bnfold.files.output_plan import MODEL_OUTPUT, OutputPlan
from bnfold.passes import rule_names
from bnfold.runtime import require_onnxruntime
from bnfold.workflow import FoldOptions, FoldOutcome, default_failed_path, fold_file, fold_plan

if TYPE_CHECKING:
    from bnfold.validate.options import VerifyOptions

NAME = "fold"
HELP = "fold BatchNormalization into neighbouring layers (the default command: `bnfold MODEL`)"

# Imported only when a run verifies (onnxruntime and the validation package cost ~0.1 s to import).
VERIFY_OPTIONS_MODULE = "bnfold.cli.verify_options"


def _verify_options():
    """The verification flags' module, or ``None`` when the validation package cannot be imported."""
    try:  # validation is optional so that folding works even if onnxruntime is broken
        return importlib.import_module(VERIFY_OPTIONS_MODULE)
    except ImportError:  # pragma: no cover - only without the validation package
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="*",
        metavar="MODEL",
        help="the ONNX model to fold; several models followed by an output directory fold them all (batch mode)",
    )
    parser.add_argument("-o", "--output", help="output path (default: <stem>.folded.onnx beside the input)")
    parser.add_argument("--in-place", action="store_true", help="replace the input file(s) (atomically)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    parser.add_argument("--only", type=comma_list, metavar="RULES", help="comma-separated rules to apply")
    parser.add_argument("--skip", type=comma_list, metavar="RULES", help="comma-separated rules not to apply")
    parser.add_argument("--list-rules", action="store_true", help="print the rule names and exit")
    parser.add_argument(
        "--lower-standalone",
        action="store_true",
        help="replace every BatchNormalization no rule folds by a precomputed per-channel Mul + Add",
    )
    parser.add_argument(
        "--freeze-initializer-inputs",
        action="store_true",
        help="remove initializers from the graph inputs first (IR >= 4), so BNs whose parameters were overridable"
        " defaults fold; callers can then no longer feed those tensors",
    )
    parser.add_argument(
        "--allow-precision-loss",
        action="store_true",
        help="fold even where the folded weights would round far worse than the original in their dtype"
        " (FOLD_LOSES_PRECISION; see docs/rules.md, fp16 precision guard)",
    )
    parser.add_argument("--no-verify", action="store_true", help="do not verify the folded model")
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="when verification fails, keep the folded model as <output stem>.failed.onnx, by default"
        " <stem>.folded.failed.onnx (never at the output path)",
    )
    parser.add_argument("--junit-xml", metavar="PATH", help="write JUnit XML (one testcase per provider × output)")
    parser.add_argument(
        "-j",
        "--jobs",
        type=positive_int,
        metavar="N",
        help="batch mode: fold N models at a time in worker processes (default: the number of CPUs)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also list every BatchNormalization")
    verify_options = _verify_options()
    if verify_options is not None:
        verify_options.add_verify_arguments(parser)


def default_output_path(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.folded.onnx")


def resolve_output(args: argparse.Namespace) -> str:
    """The output path as given (``-o ''`` and ``-o dir/`` stay as typed, for the output plan to refuse)."""
    if args.in_place:
        if args.output is not None:
            raise UsageError("--in-place and --output are mutually exclusive")
        return args.model
    return args.output if args.output is not None else os.fspath(default_output_path(Path(args.model)))


def fold_options_from_args(args: argparse.Namespace) -> FoldOptions:
    """The fold options the flags ask for (unknown rule names: a usage error, before any model is read)."""
    return FoldOptions(
        only=args.only,
        skip=args.skip,
        lower_standalone=args.lower_standalone,
        freeze_initializer_inputs=getattr(args, "freeze_initializer_inputs", False),
        allow_precision_loss=getattr(args, "allow_precision_loss", False),
    )


def verify_options_from_args(args: argparse.Namespace) -> VerifyOptions | None:
    """The verification options the flags ask for; ``None`` with ``--no-verify`` (or without validation)."""
    if not args.no_verify:  # one line saying what to install, before anything is read or written
        require_onnxruntime("verification", "pass --no-verify to fold without verifying")
    module = None if args.no_verify else _verify_options()
    return None if module is None else module.verify_options_from_args(args)


def run(args: argparse.Namespace) -> int:
    stdout_json = args.json == "-"
    console = make_console(file=sys.stderr if stdout_json else sys.stdout, quiet=args.quiet)
    if args.list_rules:
        for name in rule_names():
            print(name)
        return ExitCode.OK
    paths = list(args.model or [])
    if not paths:
        raise UsageError("a MODEL path is required")
    options = fold_options_from_args(args)
    verify = verify_options_from_args(args)
    jobs = _batch_jobs(args, paths)
    if jobs is not None:
        return _run_batch(args, console, jobs, options, verify)
    args.model = paths[0]
    return _run_single(args, console, options, verify)


# --- one model ---------------------------------------------------------------------------------------------


def _run_single(args: argparse.Namespace, console: Console, options: FoldOptions, verify: VerifyOptions | None) -> int:
    output = resolve_output(args)
    keep_failed = default_failed_path(output) if args.keep_failed else None
    plan = fold_plan(args.model, output, verify, keep_failed, in_place=args.in_place).write(args.json, "--json")
    plan.write(args.junit_xml, "--junit-xml").check()  # every path, before anything is read or written
    outcome = fold_file(args.model, output, options, verify, keep_failed=keep_failed, plan=plan)
    render_fold_summary(
        console,
        outcome.report,
        source=args.model,
        destination=outcome.written,
        size_before=outcome.size_before,
        size_after=outcome.size_after,
        seconds=outcome.seconds,
    )
    if args.verbose:
        render_fold_records(console, outcome.report)
    kept_line = kept_data_line(outcome.kept_data, args.model)
    if kept_line is not None:
        console.print(kept_line, markup=False, highlight=False, soft_wrap=True)
    verification = outcome.verification
    if verification is not None:
        _verify_options().render_verify_report(console, verification, written=outcome.written is not None)
    if args.json:
        write_json(args.json, outcome.to_dict())
    if verification is not None:
        from bnfold.validate.junit import JUnitSuite, verify_cases, write_junit_xml

        if args.junit_xml:
            write_junit_xml(args.junit_xml, [JUnitSuite("bnfold fold", verify_cases(verification))])
        render_failure_line(  # even with -q: what failed, and that nothing was written
            make_console(stderr=True),
            verification,
            subject=args.model,
            nothing_written=outcome.written is None,
            kept=outcome.kept_failed,
        )
    from bnfold.validate.github_summary import append_step_summary, fold_markdown

    append_step_summary(fold_markdown(outcome.report, verification, source=args.model, written=outcome.written))
    return outcome.exit_code


# --- batch mode --------------------------------------------------------------------------------------------


def _batch_jobs(args: argparse.Namespace, paths: list[str]) -> list[batch.FoldJob] | None:
    """The jobs of a batch run, or ``None`` for the single-model mode.

    Batch mode: several models, or a model followed by a directory (existing, or named with a trailing ``/``).
    """
    last = paths[-1]
    names_directory = len(paths) >= 2 and (Path(last).is_dir() or last.endswith(("/", os.sep)))
    if len(paths) == 1 or (len(paths) >= 2 and args.in_place and not names_directory):
        if len(paths) == 1:
            return None
        sources, destinations = paths, paths
    elif not names_directory:
        raise UsageError(f"{last}: with several models the last argument must be an output directory (or --in-place)")
    else:
        if args.in_place:
            raise UsageError("--in-place and an output directory are mutually exclusive")
        sources = paths[:-1]
        Path(last).mkdir(parents=True, exist_ok=True)
        destinations = batch.output_paths(sources, last)
    if args.output is not None:
        raise UsageError("--output names one file; in batch mode give an output directory instead")
    for option in ("load_inputs", "save_inputs"):
        if getattr(args, option, None):
            raise UsageError(f"--{option.replace('_', '-')} applies to one model; not available in batch mode")
    return [
        batch.FoldJob(source, destination, os.fspath(default_failed_path(destination)) if args.keep_failed else None)
        for source, destination in zip(sources, destinations, strict=True)
    ]


def _run_batch(
    args: argparse.Namespace,
    console: Console,
    jobs: list[batch.FoldJob],
    options: FoldOptions,
    verify: VerifyOptions | None,
) -> int:
    plan = OutputPlan()
    for job in jobs:
        plan.read(job.source, "the input")
        plan.write(job.destination, MODEL_OUTPUT, replaces=job.source if job.in_place else None)
        plan.write(job.keep_failed, "--keep-failed")
    plan.write(args.json, "--json").write(args.junit_xml, "--junit-xml").check()
    workers = args.jobs or min(len(jobs), os.cpu_count() or 1)
    started = time.perf_counter()
    outcomes: list[FoldOutcome] = []
    errors = Console(stderr=True)
    stream = batch.fold_jobs(jobs, options, verify, workers=workers)
    for outcome in with_progress(console, stream, len(jobs), quiet=args.quiet):
        outcomes.append(outcome)
        render_batch_outcome(errors if args.quiet and not outcome.ok else console, outcome, verbose=args.verbose)
    totals = batch_totals(outcomes, time.perf_counter() - started)
    render_batch_total(console, totals)
    if args.json:
        write_json(args.json, {"models": [outcome.to_dict() for outcome in outcomes], "total": totals})
    return batch.batch_exit_code(outcomes)


def batch_totals(outcomes: list[FoldOutcome], seconds: float) -> dict[str, Any]:
    """The ``total`` record of a batch run (printed last and written to ``--json``)."""
    reports = [outcome.report for outcome in outcomes if outcome.report is not None]
    return {
        "models": len(outcomes),
        "succeeded": sum(outcome.ok for outcome in outcomes),
        "with_folds": sum(outcome.ok and bool(outcome.report and outcome.report.folded) for outcome in outcomes),
        "failed": sum(not outcome.ok for outcome in outcomes),
        "batch_norm_folded": sum(len(report.folded) for report in reports),
        "batch_norm_total": sum(len(report.records) for report in reports),
        "seconds": round(seconds, 6),
    }
