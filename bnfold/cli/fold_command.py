"""``bnfold [fold] MODEL``: fold, write atomically, verify (unless --no-verify), summarise.

Batch mode: ``bnfold fold A.onnx B.onnx DIR/ -j N`` folds every model into ``DIR`` with ``N`` worker processes
(``--in-place`` instead of ``DIR`` replaces each input), prints one line per model and a total, and shows a
progress bar when stdout is a terminal and the work lasts more than about a second.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.text import Text

from bnfold import batch, io, streaming
from bnfold.cli.arg_types import comma_list, positive_int
from bnfold.cli.output_paths import check_json_path, check_output_path
from bnfold.cli.render import human_bytes, render_fold_records, render_fold_summary
from bnfold.errors import ExitCode, UsageError
from bnfold.passes import rule_names

NAME = "fold"
HELP = "fold BatchNormalization into neighbouring layers (the default command: `bnfold MODEL`)"

# Imported only when a run verifies (onnxruntime and the validation package cost ~0.1 s to import).
VERIFY_OPTIONS_MODULE = "bnfold.cli.verify_options"
# What batch workers import before their first model when verifying (onnxruntime is initialised once per worker).
VERIFY_PRELOAD = (VERIFY_OPTIONS_MODULE, "bnfold.validate.verifier")


def _verify_options():
    """The verification helpers, or ``None`` when the validation package cannot be imported."""
    try:  # validation is optional so that folding works even if onnxruntime is broken
        return importlib.import_module(VERIFY_OPTIONS_MODULE)
    except ImportError:  # pragma: no cover - only without the validation package
        return None


# The batch progress bar appears only when the work has lasted this long (and stdout is a terminal).
PROGRESS_AFTER_SECONDS = 1.0


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
    parser.add_argument("--no-verify", action="store_true", help="do not verify the folded model")
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="when verification fails, keep the folded model as <stem>.failed.onnx (never at the output path)",
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


def resolve_output(args: argparse.Namespace) -> Path:
    source = Path(args.model)
    if args.in_place:
        if args.output:
            raise UsageError("--in-place and --output are mutually exclusive")
        return source
    output = Path(args.output) if args.output else default_output_path(source)
    check_output_path(source, output, " (use --in-place to mean it)")
    return output


def run(args: argparse.Namespace) -> int:
    stdout_json = args.json == "-"
    console = Console(file=sys.stderr if stdout_json else sys.stdout, quiet=args.quiet)
    if args.list_rules:
        for name in rule_names():
            print(name)
        return ExitCode.OK
    paths = list(args.model or [])
    if not paths:
        raise UsageError("a MODEL path is required")
    check_json_path(args.json)  # before any output is committed
    plan = _batch_plan(args, paths)
    if plan is not None:
        return _run_batch(args, console, plan)
    args.model = paths[0]
    return _run_single(args, console)


# --- one model ---------------------------------------------------------------------------------------------


def _run_single(args: argparse.Namespace, console: Console) -> int:
    stdout_json = args.json == "-"
    output = resolve_output(args)
    started = time.perf_counter()
    folded = streaming.fold_to_staged(
        args.model, output, only=args.only, skip=args.skip, lower_standalone=args.lower_standalone
    )
    report = folded.report
    verification = None
    size_after = None
    verify_options = None if args.no_verify else _verify_options()
    with folded.staged as staged:
        if verify_options is not None:
            verification = verify_options.verify_from_args(
                args, args.model, staged.path, probes=report.probe_tensors(), candidate_label=str(output)
            )
        passed = verification is None or not verification.failed  # a SKIPPED provider is not a failure
        if passed:
            size_after = staged.size_bytes()
            staged.commit()
            if args.in_place:
                staged.remove_superseded_data()
        elif args.keep_failed:
            io.save_model(io.load_model(staged.path), default_failed_path(output))
    seconds = time.perf_counter() - started
    render_fold_summary(
        console,
        report,
        source=args.model,
        destination=str(output) if passed else None,
        size_before=folded.size_before,
        size_after=size_after,
        seconds=seconds,
    )
    if args.verbose:
        render_fold_records(console, report)
    if verification is not None:
        verify_options.render_verify_report(console, verification)
    if args.json:
        document = {
            "input": str(args.model),
            "output": str(output) if passed else None,
            "size_before": folded.size_before,
            "size_after": size_after,
            "seconds": round(seconds, 6),
            "fold": report.to_dict(),
            "verify": verification.to_dict() if verification is not None else None,
        }
        _write_json(args.json, document, stdout_json)
    if verification is not None:
        from bnfold.validate.github_summary import append_step_summary, verify_markdown
        from bnfold.validate.junit import JUnitSuite, verify_cases, write_junit_xml

        if args.junit_xml:
            write_junit_xml(args.junit_xml, [JUnitSuite("bnfold fold", verify_cases(verification))])
        append_step_summary(verify_markdown(verification))
        return verify_options.verify_exit_code(verification)
    return ExitCode.OK


def default_failed_path(output: Path) -> Path:
    name = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{name}.failed.onnx")


def _write_json(target: str, document: dict, to_stdout: bool) -> None:
    text = json.dumps(document, indent=2)
    if to_stdout:
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


# --- batch mode --------------------------------------------------------------------------------------------


def _batch_plan(args: argparse.Namespace, paths: list[str]) -> list[batch.FoldJob] | None:
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
    if args.output:
        raise UsageError("--output names one file; in batch mode give an output directory instead")
    for option in ("load_inputs", "save_inputs"):
        if getattr(args, option, None):
            raise UsageError(f"--{option.replace('_', '-')} applies to one model; not available in batch mode")
    only = tuple(args.only) if args.only is not None else None
    skip = tuple(args.skip) if args.skip is not None else None
    return [
        batch.FoldJob(source, destination, only, skip, args.lower_standalone)
        for source, destination in zip(sources, destinations, strict=True)
    ]


def _verify_staged(args: argparse.Namespace, original: str, candidate: str, probes: dict[str, str]):
    """The batch verifier: the same flags as the single-model run (module level so that workers can unpickle it)."""
    return _verify_options().verify_from_args(args, original, candidate, probes=probes)


def _run_batch(args: argparse.Namespace, console: Console, jobs: list[batch.FoldJob]) -> int:
    from bnfold.api import make_fold_pass

    make_fold_pass(args.only, args.skip)  # unknown rule names: one usage error, not one per model
    verify = not args.no_verify and _verify_options() is not None
    verifier = functools.partial(_verify_staged, _picklable(args)) if verify else None
    workers = args.jobs or min(len(jobs), os.cpu_count() or 1)
    started = time.perf_counter()
    results: list[batch.BatchResult] = []
    stream = batch.fold_jobs(jobs, workers=workers, verifier=verifier, preload=VERIFY_PRELOAD if verify else ())
    errors = Console(stderr=True)
    for result in _with_progress(console, stream, len(jobs), quiet=args.quiet):
        results.append(result)
        _print_result(errors if args.quiet and not result.ok else console, result, verbose=args.verbose)
    seconds = time.perf_counter() - started
    _print_total(console, results, seconds)
    if args.json:
        document = {"models": [result.to_dict() for result in results], "total": _totals(results, seconds)}
        _write_json(args.json, document, args.json == "-")
    return batch.batch_exit_code(results)


def _picklable(args: argparse.Namespace) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.run = None  # the dispatcher's entry point is not needed by the workers
    return copy


def _with_progress(
    console: Console, results: Iterator[batch.BatchResult], total: int, *, quiet: bool
) -> Iterator[batch.BatchResult]:
    """Yield ``results``; after :data:`PROGRESS_AFTER_SECONDS` on a terminal, also show a progress bar.

    The bar appears at the first result after the threshold (or never when all is done before it).
    """
    if quiet or not console.is_terminal:
        yield from results
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    progress: Progress | None = None
    done = 0
    try:
        for result in results:
            done += 1
            if progress is None and time.perf_counter() - started > PROGRESS_AFTER_SECONDS and done < total:
                progress = Progress(
                    TextColumn("folding"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                progress.start()
                task = progress.add_task("models", total=total, completed=done - 1)
            yield result
            if progress is not None:
                progress.update(task, completed=done)
    finally:
        if progress is not None:
            progress.stop()


def _print_result(console: Console, result: batch.BatchResult, *, verbose: bool) -> None:
    source = result.job.source
    if result.error is not None and result.report is None:
        console.print(Text.assemble(("✗ ", "bold red"), f"{source}: error: {result.error}"), soft_wrap=True)
        return
    report = result.report
    parts = [f"{len(report.folded)}/{len(report.records)} BN folded"]
    if result.size_before is not None:
        after = human_bytes(result.size_after) if result.size_after is not None else "(not written)"
        parts.append(f"{human_bytes(result.size_before)} → {after}")
    parts.append(f"{result.seconds:.2f} s")
    if result.verified is not None:
        parts.append("verify passed" if result.verified else "verify FAILED")
    mark = ("✓ ", "bold green") if result.ok else ("✗ ", "bold red")
    arrow = f" → {result.destination}" if result.destination is not None else " (not written)"
    console.print(Text.assemble(mark, f"{source}{arrow}: " + ", ".join(parts)), soft_wrap=True)
    if verbose:
        render_fold_records(console, report)


def _totals(results: list[batch.BatchResult], seconds: float) -> dict[str, int | float]:
    return {
        "models": len(results),
        "succeeded": sum(result.ok for result in results),
        "failed": sum(not result.ok for result in results),
        "batch_norm_folded": sum(len(result.report.folded) for result in results if result.report is not None),
        "batch_norm_total": sum(len(result.report.records) for result in results if result.report is not None),
        "seconds": round(seconds, 6),
    }


def _print_total(console: Console, results: list[batch.BatchResult], seconds: float) -> None:
    totals = _totals(results, seconds)
    style = "bold green" if totals["failed"] == 0 else "bold red"
    console.print(
        Text.assemble(
            ("total: ", "bold"),
            (f"{totals['succeeded']}/{totals['models']} models folded", style),
            f", {totals['failed']} failed, {totals['batch_norm_folded']}/{totals['batch_norm_total']} BN folded, "
            f"{seconds:.2f} s",
        ),
        soft_wrap=True,
    )
